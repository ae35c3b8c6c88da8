"""oncely.sdk: what runs a handler.

The journal/replay engine behind `Context` (`journal`), the handler-running
core that turns a `HandlerCall` into an `Outcome` (`runner`) and the types of
that boundary (`protocol`). It imports neither confluent_kafka nor rocksdict:
the processor runs it in process today, and a remote HTTP endpoint can run
the same code where there is no broker client and no store.
"""
