"""oncely: a Kafka-native exactly-once event processor."""

__version__ = "0.1.0"
