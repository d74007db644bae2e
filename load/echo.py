"""A Kafka echo service: the floor under any request/response service on Kafka.

    python -m load.echo TOPOLOGY --bootstrap HOST:PORT --input IN --output OUT

Each record read from ``IN`` goes back, unchanged, to ``OUT``: a request's whole round
trip through the broker (client → broker → service → broker → client) with no work in
between. It reads and writes with the librdkafka settings kp-pipeline would use for
``TOPOLOGY`` (`pipeline.kafka.clients`: fetch wait, linger, group protocol), joins a group
of its own and reads as kp-pipeline's loop does (`consume_available`, ``flow``), so a
latency measured through it and through kp-pipeline at the same rate differs only by
what kp-pipeline does between the two hops: batching, the model, its bookkeeping.

Prints ``ready`` once assigned, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from confluent_kafka import Consumer, Producer

from pipeline.app import open_topology
from pipeline.kafka.clients import consumer_config, is_embedded_broker, producer_config
from pipeline.kafka.consume import consume_available


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.echo", description=__doc__.splitlines()[0])
    p.add_argument("topology")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", default="kp-echo")
    args = p.parse_args(argv)
    topology = open_topology(args.topology).topology
    kafka = topology.kafka.model_copy(update={"group_id": args.group})
    embedded = is_embedded_broker(kafka, args.bootstrap)
    consumer = Consumer(consumer_config(kafka, args.bootstrap, embedded))
    producer = Producer(producer_config(kafka, args.bootstrap))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def assigned(_consumer: Any, partitions: list[Any]) -> None:
        if partitions:
            print("ready", flush=True)

    consumer.subscribe([args.input], on_assign=assigned)
    wait = topology.flow.poll_timeout_ms / 1000.0
    try:
        while not stop.is_set():
            for msg in consume_available(consumer, topology.flow.consume_batch, wait):
                if msg.error() is None:
                    producer.produce(args.output, msg.value(), msg.key())
            producer.poll(0)
    finally:
        producer.flush(10)
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
