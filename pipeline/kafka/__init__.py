"""Talking to Kafka: client settings built from a topology (`clients`), the embedded broker."""
