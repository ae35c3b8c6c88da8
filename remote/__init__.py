"""oncely.remote: run an app's handlers behind an HTTP endpoint.

The endpoint side of remote (serverless) handlers: `Endpoint(app)` serves an
ordinary `oncely.App` over aiohttp (`.aiohttp_app()`), any ASGI server
(`.asgi()`) or AWS Lambda (`lambda_handler(endpoint)`). Handlers run on the
same journal engine as in the processor; every effect comes back as data
(wire protocol v1, `oncely.remote.wire`) for the processor to apply in its
transaction. Requests are signed (`sign_request`, `oncely.remote.signing`).

Imports neither confluent_kafka nor rocksdict.
"""

from oncely.remote.aws_lambda import lambda_handler
from oncely.remote.effects import NeedState
from oncely.remote.endpoint import Endpoint
from oncely.remote.signing import (SigningKey, Verifier, generate_signing_key, load_signing_key, parse_public_key,
                                   sign_request)

__all__ = ["Endpoint", "NeedState", "SigningKey", "Verifier", "generate_signing_key", "lambda_handler",
           "load_signing_key", "parse_public_key", "sign_request"]
