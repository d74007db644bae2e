"""Which broker refusals of a produced record are final, whichever client sent it.

A record refused for one of these reasons is refused again if the same bytes go to the
same topic, so retrying in place would stall the partition forever: the outcome is
replaced instead (a result becomes an ``undeliverable`` dead letter, a dead letter loses
the request's bytes; `pipeline.serving.outcomes.OutcomeEncoder.stand_in`). Any other
failure is transient (a broker restart, a moved leader) and is retried.

Both clients speak the Kafka protocol's error codes: librdkafka's ``KafkaError.code()``
is the protocol code for broker errors (and negative for its own), aiokafka's errors
carry it as ``errno``. So the list is written once, in protocol codes.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PERMANENT", "is_permanent"]

CORRUPT_MESSAGE: Final = 2
UNKNOWN_TOPIC_OR_PARTITION: Final = 3
INVALID_MESSAGE_SIZE: Final = 4
MESSAGE_TOO_LARGE: Final = 10
INVALID_TOPIC: Final = 17
RECORD_LIST_TOO_LARGE: Final = 18
TOPIC_AUTHORIZATION_FAILED: Final = 29
INVALID_RECORD: Final = 87
LOCAL_UNKNOWN_TOPIC: Final = -188  # librdkafka's own: the topic is not in the cluster

PERMANENT: Final = frozenset(
    {
        CORRUPT_MESSAGE,
        UNKNOWN_TOPIC_OR_PARTITION,
        INVALID_MESSAGE_SIZE,
        MESSAGE_TOO_LARGE,
        INVALID_TOPIC,
        RECORD_LIST_TOO_LARGE,
        TOPIC_AUTHORIZATION_FAILED,
        INVALID_RECORD,
        LOCAL_UNKNOWN_TOPIC,
    }
)


def is_permanent(code: int | None) -> bool:
    """Whether a refusal with this error code will be repeated for the same record."""
    return code in PERMANENT
