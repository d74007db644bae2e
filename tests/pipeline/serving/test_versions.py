"""Which version a request meets: asked for, the default, or a canary by record key."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.versions import VersionTraffic
from pipeline.serving.routing import ModelRoute, Router
from pipeline.serving.versions import Traffic, split_point, traffic_of, version_key
from schemas.errors import RoutingError
from schemas.messages import Request
from schemas.tensors import TensorSpec

X = {"x": TensorSpec("FP32", (4,))}
SPLIT_M_USER_1 = 0.22871204989635102  # blake2b-64 of b"user-1" salted b"m", over 2**64
SERVED = [("m", "1"), ("m", "2"), ("m", "3"), ("k", "7")]
TRAFFIC = traffic_of(SERVED, {"m": VersionTraffic(default="1", canary={"2": 0.25, "3": 0.05})})
ROUTER = Router(
    {
        version_key(n, v, 3 if n == "m" else 1): ModelRoute(
            n, v, X, key=version_key(n, v, 3 if n == "m" else 1)
        )
        for n, v in SERVED
    },
    TRAFFIC,
)


def _request(model: str = "m", version: str | None = None, rid: str = "r") -> Request:
    return Request(rid, model, {"x": np.ones(4, np.float32)}, model_version=version)


def test_versions_of_one_name_are_served_under_name_at_version() -> None:
    assert TRAFFIC["m"].keys == {"1": "m@1", "2": "m@2", "3": "m@3"}
    assert TRAFFIC["k"] == Traffic("k", {"7": "k"}, "7")
    assert ROUTER.direct.keys() == {"k"}  # only single-version names take the fast path
    assert [entry[0] for entry in ROUTER.exact_keys] == ["k"]


def test_a_request_naming_a_version_meets_it_and_an_unknown_one_is_refused() -> None:
    assert ROUTER.route(_request(version="3"), b"any").key == "m@3"
    with pytest.raises(RoutingError) as e:
        ROUTER.route(_request(version="9"))
    assert str(e.value) == "model 'm' version '9' is not served (serving '1', '2', '3')"
    assert ROUTER.route(_request("k", "7")).key == "k"
    with pytest.raises(RoutingError, match=r"version '1' is not served \(serving '7'\)"):
        ROUTER.route(_request("k", "1"))


def test_canaries_take_their_share_of_keys_and_the_default_the_rest() -> None:
    keys = [b"user-%d" % i for i in range(20_000)]
    met = [ROUTER.route(_request(), key).key for key in keys]
    assert abs(met.count("m@2") / len(keys) - 0.25) < 0.015
    assert abs(met.count("m@3") / len(keys) - 0.05) < 0.01
    assert abs(met.count("m@1") / len(keys) - 0.70) < 0.015
    assert TRAFFIC["m"].shares() == pytest.approx({"1": 0.70, "2": 0.25, "3": 0.05})


@given(st.binary(max_size=64), st.text(max_size=20))
def test_one_key_always_meets_the_same_version(key: bytes, rid: str) -> None:
    first = ROUTER.route(_request(rid=rid), key).key
    assert ROUTER.route(_request(rid=rid + "x"), key).key == first  # whatever the request


def test_a_record_without_a_key_is_split_by_its_request_id() -> None:
    by_id = {ROUTER.route(_request(rid=f"r{i}")).key for i in range(200)}
    assert by_id == {"m@1", "m@2", "m@3"}
    assert ROUTER.route(_request(rid="r7")).key == ROUTER.route(_request(rid="r7"), b"r7").key


def test_the_split_point_is_fixed_across_processes_and_salted_by_model() -> None:
    # A replica restarted, another replica, or the next release must send a key where this
    # one did: the hash is pinned here, not only compared with itself.
    assert split_point("m", b"user-1") == pytest.approx(SPLIT_M_USER_1, abs=1e-12)
    assert split_point("m", b"user-1") != split_point("k", b"user-1")


def test_a_version_added_while_serving_takes_only_what_names_it_until_a_split_moves() -> None:
    router = Router({"k": ModelRoute("k", "7", X)})
    assert router.direct.keys() == {"k"}
    router.add_route(ModelRoute("k", "8", X, key="k@8"))
    assert router.traffic["k"].keys == {"7": "k", "8": "k@8"}
    assert router.direct == {}  # two versions: routed by version, not the fast path
    assert router.route(_request("k")).key == "k"
    assert router.route(_request("k", "8")).key == "k@8"
    router.set_traffic("k", Traffic("k", router.traffic["k"].keys, "8"))
    with pytest.raises(ValueError, match="the split still sends it requests"):
        router.remove_route("k@8")
    router.remove_route("k")
    assert router.traffic["k"].keys == {"8": "k@8"}
    assert router.direct.keys() == {"k"}  # one version again: the fast path again
    assert [entry[0] for entry in router.exact_keys] == ["k@8"]
    with pytest.raises(RoutingError, match="version '7' is not served"):
        router.route(_request("k", "7"))
