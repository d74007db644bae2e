"""Both clients' refusals are judged by one list of Kafka protocol codes."""

from __future__ import annotations

import aiokafka.errors as aio  # type: ignore[import-untyped]
import pytest
from confluent_kafka import KafkaError

from pipeline.kafka.refusals import is_permanent


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_MSG,
    ],
)
def test_librdkafkas_final_refusals(code: int) -> None:
    assert is_permanent(code)


@pytest.mark.parametrize(
    "error",
    [
        aio.MessageSizeTooLargeError,
        aio.RecordListTooLargeError,
        aio.CorruptRecordException,
        aio.InvalidMessageError,
        aio.TopicAuthorizationFailedError,
        aio.UnknownTopicOrPartitionError,
        aio.InvalidTopicError,
    ],
)
def test_aiokafkas_final_refusals(error: type[Exception]) -> None:
    assert is_permanent(getattr(error(), "errno", None))


def test_outages_are_transient_for_both() -> None:
    for code in (
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
    ):
        assert not is_permanent(code)
    for error in (
        aio.KafkaConnectionError(),
        aio.NotLeaderForPartitionError(),
        aio.KafkaTimeoutError(),
    ):
        assert not is_permanent(getattr(error, "errno", None))
