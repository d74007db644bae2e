"""A consumed record's first step, the same behind every front door: decode, route, key.

`Intake.admit` turns an `Envelope` into the served model's name and the key of the
batch it may join (the model and, for models with free dimensions, the input shapes; a
text's length bucket), or into its dead letter when it cannot be served: a tombstone,
bytes that are not a request (``undecodable``), a model that is not served
(``unknown_model``), tensors that do not fit (``bad_tensor``). The Kafka loop calls it
per record on its hot path; the Faust adapter per event.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.routing import ModelRoute, Router
from schemas.codec import AvroCodec
from schemas.errors import RequestError
from schemas.messages import Envelope

__all__ = ["Admitted", "Intake"]

Admitted = tuple[str, Hashable]
"""A request that may be served: its model's name and the key of the batch it joins."""


class Intake:
    """Decodes, routes and keys consumed records for the models of one topology."""

    def __init__(self, graph: Sequence[ServedModel], codec: AvroCodec, encoder: OutcomeEncoder):
        self.codec = codec
        self.encoder = encoder
        self.router = Router(
            {m.name: ModelRoute(m.name, m.settings.version, m.inputs, m.bucketer) for m in graph}
        )

    def admit(self, env: Envelope, tombstone: bool = False) -> Admitted | Outcome:
        """``(model, batch key)`` with ``env.request`` decoded, or the record's dead letter.

        ``tombstone``: the record had no value at all (``env.value`` is then empty).
        """
        try:
            if tombstone:
                raise RequestError("record has no value (tombstone)")
            request = env.request
            if request is None:
                env.request = request = self.codec.decode_request(env.value)
            route = self.router.route(request)
            return route.name, route.batch_key(request)
        except RequestError as e:
            return self.encoder.dead_letter(env, e.reason, str(e))
