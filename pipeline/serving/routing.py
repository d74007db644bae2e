"""Which model a request goes to, whether its tensors fit, and which batch it joins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np

from pipeline.serving.versions import Traffic
from schemas.errors import RoutingError, TensorError
from schemas.messages import Request
from schemas.signatures import Signature
from schemas.tensors import TensorSpec, numpy_dtype, oip_datatype

__all__ = ["ModelRoute", "Router"]


class ModelRoute:
    """One served model's name, version and declared inputs.

    ``key`` is what the pipeline serves it under (`pipeline.serving.versions.version_key`):
    its name, or ``name@version`` where the model is served in several versions.
    """

    def __init__(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, TensorSpec],
        bucketer: Callable[[Mapping[str, Any]], Hashable] | None = None,
        key: str | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.key = key or name
        self.inputs = dict(inputs)
        self.bucketer = bucketer  # e.g. a text's length bucket: one open batch per bucket
        # With no free dimension every request of the model shares one signature, and the
        # check is a dtype and shape comparison per tensor (the common, hot case).
        self._fixed = all(None not in s.shape for s in self.inputs.values())
        self._exact: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] | None = None
        if self._fixed and "BYTES" not in {s.datatype for s in self.inputs.values()}:
            self._exact = {
                n: (numpy_dtype(s.datatype), tuple(d for d in s.shape if d is not None))
                for n, s in self.inputs.items()
            }

    @property
    def exact(self) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]] | None:
        """The one signature every request must have, when there is one and no bucketing.

        A request with exactly these tensors joins the batch keyed by the model's name.
        """
        return self._exact if self.bucketer is None else None

    def batch_key(self, request: Request) -> Hashable:
        """Check the request's tensors; return the key of the batch it may join."""
        exact = self._exact
        if exact is not None and self.bucketer is None:  # the hot case, inline
            tensors = request.inputs
            if len(tensors) == len(exact):
                for name, (dtype, shape) in exact.items():
                    arr = tensors.get(name)
                    if arr is None or arr.dtype != dtype or arr.shape != shape:
                        break
                else:
                    return self.name
        key = self._signature_key(request)
        if self.bucketer is None:
            return key
        return (key, self.bucketer(request.inputs))

    def _signature_key(self, request: Request) -> Hashable:
        tensors = request.inputs
        exact = self._exact
        if exact is not None and len(tensors) == len(exact):
            for name, (dtype, shape) in exact.items():
                arr = tensors.get(name)
                if arr is None or arr.dtype != dtype or arr.shape != shape:
                    break
            else:
                return self.name
        if tensors.keys() != self.inputs.keys():
            missing = sorted(self.inputs.keys() - tensors.keys())
            extra = sorted(tensors.keys() - self.inputs.keys())
            parts = [
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
            ]
            listed = sorted(self.inputs)
            takes = ", ".join(map(repr, listed[:8])) + (", …" if len(listed) > 8 else "")
            raise TensorError(
                f"model {self.name!r}: "
                + "; ".join(p for p in parts if p)
                + f" (it takes {len(listed)} input{'s' if len(listed) > 1 else ''}: {takes})"
            )
        for name, spec in self.inputs.items():
            arr = tensors[name]
            datatype = oip_datatype(arr.dtype)
            if not spec.accepts(datatype, arr.shape):
                raise TensorError(
                    f"input {name!r} is {datatype}{list(arr.shape)}; model {self.name!r} "
                    f"takes {spec}"
                )
        if self._fixed:
            return self.name
        return (self.name, *((n, tensors[n].shape) for n in self.inputs))


class Router:
    """Finds the route of a request by model name and version (`pipeline.serving.versions`).

    ``routes`` by their key; ``traffic`` per model name (by default each route is its
    name's only version). ``direct`` holds, by name, the routes a request reaches by its
    model name alone (a name served in one version): intake's per-record fast path.
    """

    def __init__(
        self, routes: Mapping[str, ModelRoute], traffic: Mapping[str, Traffic] | None = None
    ) -> None:
        self.routes = {r.key: r for r in routes.values()}
        if traffic is None:
            traffic = {
                r.name: Traffic(r.name, {r.version: r.key}, r.version) for r in routes.values()
            }
        self.traffic = dict(traffic)
        self._index()

    def _index(self) -> None:
        """The fast paths' tables, from ``routes`` and ``traffic`` (again after a change)."""
        self.direct = {
            name: self.routes[next(iter(t.keys.values()))]
            for name, t in self.traffic.items()
            if len(t.keys) == 1
        }
        # The models with one exact signature and no bucketing, for a batch's one-call
        # check (`schemas.signatures`); entry i's requests join batch `exact_keys[i]`.
        exact = [r for r in self.direct.values() if r.exact is not None]
        signatures: dict[str, Signature] = {}
        keys: list[tuple[str, str]] = []
        for i, route in enumerate(exact):
            spec = route.exact or {}
            signatures[route.name] = (
                i,
                route.version,
                tuple(spec),
                tuple(dtype for dtype, _ in spec.values()),
                tuple(shape for _, shape in spec.values()),
            )
            keys.append((route.key, route.name))
        self.exact_signatures, self.exact_keys = signatures, keys

    def add_route(self, route: ModelRoute) -> None:
        """Serve one more version of a served model (loaded while serving).

        Its traffic keeps its split: the new version takes only requests that name it
        until a split (the control topic's) sends it more. Call it on the thread that
        routes (the replica's loop), as `remove_route`.
        """
        now = self.traffic[route.name]
        keys = {**now.keys, route.version: route.key}
        self.routes = {**self.routes, route.key: route}
        self.traffic = {**self.traffic, route.name: dataclasses.replace(now, keys=keys)}
        self._index()

    def remove_route(self, key: str) -> None:
        """Stop serving one version: requests naming it are then `RoutingError`s.

        The split must not send it traffic any more (the caller checks).
        """
        route = self.routes[key]
        now = self.traffic[route.name]
        if route.version in {now.default, *dict(now.canary), *(now.shadow or ())[:1]}:
            raise ValueError(f"{key}: the split still sends it requests")
        keys = {v: k for v, k in now.keys.items() if k != key}
        self.routes = {k: r for k, r in self.routes.items() if k != key}
        self.traffic = {**self.traffic, route.name: dataclasses.replace(now, keys=keys)}
        self._index()

    def set_traffic(self, name: str, traffic: Traffic) -> None:
        """Replace one model's split (the control topic's); its versions must not change.

        The dict is replaced whole, so a request routed on another thread meets either
        the old split or the new one.
        """
        if traffic.keys != self.traffic[name].keys:
            raise ValueError(f"model {name!r}: a split cannot change the versions served")
        self.traffic = {**self.traffic, name: traffic}

    def route(self, request: Request, key: bytes | None = None) -> ModelRoute:
        """The route for ``request``, or a `RoutingError` naming what is served.

        ``key``: the record's key, which picks a canary version for requests naming none
        (the request id where the record has none).
        """
        traffic = self.traffic.get(request.model)
        if traffic is None:
            served = ", ".join(sorted(self.traffic))
            raise RoutingError(f"unknown model {request.model!r} (served: {served})")
        asked = request.model_version
        if asked:
            served_as = traffic.keys.get(asked)
            if served_as is None:
                serving = ", ".join(repr(v) for v in traffic.keys)
                raise RoutingError(
                    f"model {request.model!r} version {asked!r} is not served (serving {serving})"
                )
            return self.routes[served_as]
        version = traffic.pick(key if key is not None else request.id.encode())
        return self.routes[traffic.keys[version]]
