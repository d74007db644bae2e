"""A consumed batch's first step, the same behind every front door: decode, route, key.

`Intake.admit_batch` decodes a batch of envelopes in one codec call
(`AvroCodec.decode_requests`), routes each request to its served model and groups the
rows by the batch they may join (the model and, for models with free dimensions, the
input shapes; a text's length bucket), in arrival order. A row that cannot be served
becomes its dead letter instead: a tombstone, bytes that are not a request
(``undecodable``), a model that is not served (``unknown_model``), tensors that do not
fit (``bad_tensor``). A batch whose every row is a request that fits its model's one
exact signature (the usual batch) is checked and grouped in one compiled call
(`schemas.signatures`); only other batches are routed row by row. The Kafka loop calls
it once per consumed batch, the Faust adapter once per batch of events; `Intake.admit`
is the one-record form.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence

from pipeline.config.topology import Topology
from pipeline.config.versions import VersionTraffic
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.routing import ModelRoute, Router
from pipeline.serving.scheduler import Classed, RequestClasses
from pipeline.serving.versions import traffic_of
from schemas import oip_json, oip_protobuf
from schemas.codec import AvroCodec, request_from_record
from schemas.errors import DecodeError, RequestError
from schemas.messages import SHADOW, SHADOWED, Envelope, Request
from schemas.signatures import match_signatures
from schemas.wire import unframe, unframe_protobuf

__all__ = ["Admitted", "Intake"]

CONTENT_TYPES = {
    b"application/json": "json",
    b"application/avro": "avro",
    b"avro/binary": "avro",
    **{kind: "protobuf" for kind in oip_protobuf.CONTENT_TYPES},
}
"""The content types a record's ``content-type`` header may name, and their encodings."""

# A row's fields read in C (``map`` of a getter over a batch, not a loop per row).
_HEADERS = operator.attrgetter("headers")
_REQUEST = operator.attrgetter("request")
_VALUE = operator.attrgetter("value")

Admitted = tuple[str, Hashable]
"""A request that may be served: its model's name and the key of the batch it joins."""


class Intake:
    """Decodes, routes and keys consumed records for the models of one topology."""

    def __init__(
        self,
        graph: Sequence[ServedModel],
        codec: AvroCodec,
        encoder: OutcomeEncoder,
        encodings: Mapping[str, str] | None = None,
        classes: RequestClasses | None = None,
        versions: Mapping[str, VersionTraffic] | None = None,
    ):
        """``encodings``: input topics whose requests are not Avro (``json``, ``protobuf``).

        ``classes``: with the device scheduler on, reads each request's priority and tenant
        into its batch key (`Classed`), so the batcher never mixes them. ``versions``: the
        topology's, for models served in several versions (`pipeline.serving.versions`).
        """
        traffic = traffic_of([(m.settings.name, m.settings.version) for m in graph], versions or {})
        self.classes = classes if classes else None
        self.codec = codec
        self.encoder = encoder
        self.router = Router(
            {
                m.name: ModelRoute(
                    m.settings.name, m.settings.version, m.inputs, m.bucketer, key=m.name
                )
                for m in graph
            },
            traffic,
        )
        self.encodings = {t: e for t, e in (encodings or {}).items() if e != "avro"}
        # Set by the shadow desk (`pipeline.lifecycle.shadow`): whether one more copy to
        # the shadow served under this key may go now. None: no shadows here.
        self.shadow_gate: Callable[[str], bool] | None = None
        names = {m.settings.name for m in graph}
        self._only_model = next(iter(names)) if len(names) == 1 else None

    @classmethod
    def for_topology(
        cls,
        graph: Sequence[ServedModel],
        codec: AvroCodec,
        encoder: OutcomeEncoder,
        topology: Topology,
        metrics: Metrics | None = None,
    ) -> Intake:
        """The intake a topology asks for: its encodings, scheduling classes and versions."""
        classes = RequestClasses(topology.scheduling, metrics)  # read when enabled
        made = cls(graph, codec, encoder, topology.topics.encoding, classes, topology.versions)
        if metrics is not None:
            for name, traffic in made.router.traffic.items():
                for version, share in traffic.shares().items():
                    metrics.version_traffic.labels(name, version).set(share)
        return made

    def admit_batch(
        self, rows: Sequence[Envelope], tombstones: Collection[int] = ()
    ) -> tuple[dict[Admitted, list[Envelope]], list[Outcome]]:
        """Rows grouped by ``(model, batch key)`` with ``request`` decoded, and dead letters.

        ``tombstones``: positions in ``rows`` of records that had no value at all (their
        ``value`` is then empty). Rows whose ``request`` is already set are not decoded
        again. Each row ends in exactly one group or as exactly one dead letter; groups
        keep the rows' order.
        """
        skip = frozenset(tombstones)
        failed: dict[int, RequestError] = {}
        if self.encodings or any(map(_HEADERS, rows)):
            failed = self._decode_other_encodings(rows, skip)
        todo: Sequence[int]
        if not skip and not failed and not any(map(_REQUEST, rows)):  # all Avro, to decode
            todo, values = range(len(rows)), list(map(_VALUE, rows))
        else:
            todo = [
                i
                for i, env in enumerate(rows)
                if env.request is None and i not in skip and (not failed or i not in failed)
            ]
            values = [rows[i].value for i in todo]
        requests = self.codec.decode_requests(values)
        if len(todo) == len(rows) and not (self.classes and _asks(rows, requests)):
            fast = self._exact(rows, requests)
            if fast is not None:
                return fast, []
        decoded = dict(zip(todo, requests, strict=True))
        groups: dict[Admitted, list[Envelope]] = {}
        letters: list[Outcome] = []
        direct = self.router.direct
        for i, env in enumerate(rows):
            try:
                if skip and i in skip:
                    raise RequestError("record has no value (tombstone)")
                if failed and i in failed:
                    raise failed[i]
                request = env.request
                if request is None:
                    got = decoded[i]
                    if isinstance(got, RequestError):
                        raise got
                    env.request = request = got
                route = direct.get(request.model)
                if route is None or request.model_version not in (None, "", route.version):
                    # several versions (the key picks a canary), or a RoutingError
                    route = self.router.route(request, env.key)
                    if not request.model_version:
                        self._shadow(env, request, route, groups)
                admitted = self._admitted(env, request, route)
            except RequestError as e:
                letters.append(self.encoder.dead_letter(env, e.reason, str(e), e.whose))
                continue
            group = groups.get(admitted)
            if group is None:
                groups[admitted] = [env]
            else:
                group.append(env)
        return groups, letters

    def _admitted(self, env: Envelope, request: Request, route: ModelRoute) -> Admitted:
        """``(model key, batch key)``, the batch key classed when the scheduler asks."""
        admitted = (route.key, route.batch_key(request))
        if self.classes is not None:
            cls = self.classes.of(env, request, route.key)
            if cls is not None:
                admitted = (route.key, Classed(admitted[1], cls))
        return admitted

    def _shadow(
        self,
        env: Envelope,
        request: Request,
        route: ModelRoute,
        groups: dict[Admitted, list[Envelope]],
    ) -> None:
        """Copy a request that met its model's default to the model's shadow, if it has one.

        The copy joins the shadow's batches; its outcome goes to the comparison
        (`pipeline.lifecycle.shadow`), the original's to the output as ever. Copies stop
        while ``shadow_gate`` says too many are outstanding: a slow shadow must not grow
        memory without bound, and the live traffic never waits for it.
        """
        traffic = self.router.traffic[route.name]
        if route.version != traffic.default:
            return
        key = traffic.shadows(env.key if env.key is not None else request.id.encode())
        if key is None or self.shadow_gate is None or not self.shadow_gate(key):
            return
        env.shadow = SHADOWED
        copy = dataclasses.replace(env, shadow=SHADOW)
        admitted = self._admitted(copy, request, self.router.routes[key])
        groups.setdefault(admitted, []).append(copy)

    def _decode_other_encodings(
        self, rows: Sequence[Envelope], skip: Collection[int]
    ) -> dict[int, RequestError]:
        """Decode the rows that are not Avro (by topic or content-type); their errors.

        Each such row gets its ``encoding`` and, when it decodes, its ``request``; Avro
        rows are left to the batch decode.
        """
        failed: dict[int, RequestError] = {}
        for i, env in enumerate(rows):
            if env.request is not None or i in skip:
                continue
            try:
                encoding, length, model = self._wire(env)
                if encoding == "avro":
                    continue
                env.encoding = encoding
                model = model or self._only_model
                value = env.value
                # A JSON Schema or Protobuf value framed by Confluent's serializers (neither
                # plain JSON nor a ModelInferRequest can start with a 0 byte): the message
                # is after the header (and Protobuf's message indexes).
                framed = value[:1] == b"\x00"
                if encoding == "json":
                    body = unframe(value)[1] if framed else value
                    record = oip_json.decode_request(body, length, model)
                else:
                    body = unframe_protobuf(value)[2] if framed else value
                    record = oip_protobuf.decode_request(body, model)
                env.request = request_from_record(record)
            except RequestError as e:
                failed[i] = e
        return failed

    def _wire(self, env: Envelope) -> tuple[str, int | None, str | None]:
        """A record's encoding, binary-data split and model, from its headers or topic."""
        encoding = self.encodings.get(env.topic, "avro")
        length = model = None
        for key, value in env.headers or ():
            name = key.lower()
            if name == "content-type":
                kind = (value or b"").split(b";")[0].strip().lower()
                if kind not in CONTENT_TYPES:
                    raise DecodeError(
                        f"content-type {kind.decode(errors='replace')!r}: this pipeline reads "
                        f"{', '.join(t.decode() for t in CONTENT_TYPES)}"
                    )
                encoding = CONTENT_TYPES[kind]
            elif name == oip_json.HEADER_LENGTH:
                try:
                    length = int(value or b"")
                except ValueError:
                    raise DecodeError(f"{key}: {value!r} is not a length") from None
            elif name == "kp.model":
                model = (value or b"").decode(errors="replace")
        return encoding, length, model

    def _exact(
        self, rows: Sequence[Envelope], requests: list[Request | RequestError]
    ) -> dict[Admitted, list[Envelope]] | None:
        """The groups when every row is a request that fits its model's exact signature.

        The usual batch, checked in one call (`schemas.signatures`); None otherwise, and
        the rows take the path that finds and names each one's defect.
        """
        router = self.router
        marks = match_signatures(requests, router.exact_signatures, self.codec.compiled)
        if not marks or min(marks) < 0:
            return None
        for env, request in zip(rows, requests, strict=True):
            env.request = request  # type: ignore[assignment]  # all are requests
        keys = router.exact_keys
        first = marks[0]
        if marks.count(first) == len(marks):  # one model: the batch as it came
            return {keys[first]: list(rows)}
        groups: dict[Admitted, list[Envelope]] = {}
        for env, mark in zip(rows, marks, strict=True):
            group = groups.get(keys[mark])
            if group is None:
                groups[keys[mark]] = [env]
            else:
                group.append(env)
        return groups

    def admit(self, env: Envelope, tombstone: bool = False) -> Admitted | Outcome:
        """``(model, batch key)`` with ``env.request`` decoded, or the record's dead letter.

        `admit_batch` for one record; ``tombstone``: it had no value at all.
        """
        groups, letters = self.admit_batch([env], (0,) if tombstone else ())
        return letters[0] if letters else next(iter(groups))


def _asks(rows: Sequence[Envelope], requests: Sequence[Request | RequestError]) -> bool:
    """Whether some row may ask the scheduler for something (parameters or headers)."""
    return any(env.headers for env in rows) or any(getattr(r, "parameters", None) for r in requests)
