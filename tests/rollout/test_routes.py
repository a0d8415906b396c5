"""Routing replay (R3) without a server: the route format, SGLang's wire format, the refusal
behind sglang-router, packing, the mismatch metrics per layer and rollouts.jsonl.

The real server (SGLang's own decoder on its real output, the router dropping the field) and the
real actor are in tests/rollout/test_routes_real.py, tests/parallel/test_routing_replay_parallel.py
and tests/e2e/test_routing_replay_e2e.py."""

from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest
import torch

from drpo_megatron.config import ConfigError, load_config
from drpo_megatron.mismatch.monitor import MismatchMonitor
from drpo_megatron.operate.rundir import RolloutRecorder
from drpo_megatron.rollout.engine import parse_sample
from drpo_megatron.rollout.routes import (RoutesError, RouteSpec, check_routing_replay_front,
                                          decode_routed_experts, routes_bytes_per_token)
from drpo_megatron.samples import RoutedExperts, Sample
from drpo_megatron.training.batch import pack_samples
from drpo_megatron.training.routing_replay import TrainerRoutes

SPEC = RouteSpec(num_layers=2, top_k=2, num_experts=4)


def _wire(ids: np.ndarray) -> str:
    """SGLang 0.5.23's encoding: base64 of the little-endian int32 array, flattened."""
    return base64.b64encode(np.asarray(ids, dtype="<i4").tobytes()).decode()


def _sample(p: int, r: int, routes: np.ndarray | None = None, **kw) -> Sample:
    return Sample(group_id=0, prompt_ids=list(range(1, p + 1)), response_ids=list(range(50, 50 + r)),
                  rollout_logp=[-1.0] * r, text="", finish_reason="stop", weight_version="0",
                  routed_experts=None if routes is None else RoutedExperts.from_array(routes), **kw)


# ----------------------------------------------------------------------------- the format
def test_routed_experts_compact_roundtrip():
    ids = np.array([[[0, 3], [2, 1]], [[1, 2], [3, 0]], [[0, 1], [1, 2]]])
    re = RoutedExperts.from_array(ids)
    assert re.dtype == "uint8" and re.shape == (3, 2, 2) and len(re.data) == 12
    assert (re.array() == ids).all()
    assert RoutedExperts.from_json(json.loads(json.dumps(re.to_json()))) == re
    assert pickle.loads(pickle.dumps(re)) == re
    big = RoutedExperts.from_array(np.array([[[0, 300]]]))
    assert big.dtype == "int16" and (big.array() == [[[0, 300]]]).all()
    with pytest.raises(ValueError, match="negative"):
        RoutedExperts.from_array(np.array([[[-1, 0]]]))
    with pytest.raises(ValueError, match=r"\[tokens, layers, top_k\]"):
        RoutedExperts.from_array(np.zeros((3, 2)))
    bad = dict(re.to_json(), shape=[4, 2, 2])
    with pytest.raises(ValueError, match="do not hold"):
        RoutedExperts.from_json(bad)


def test_bytes_per_token():
    assert routes_bytes_per_token(SPEC) == {"stored": 4.0, "jsonl": 16 / 3, "wire": 64 / 3}
    qwen3_30b = RouteSpec(num_layers=48, top_k=8, num_experts=128)
    assert routes_bytes_per_token(qwen3_30b)["stored"] == 384
    assert routes_bytes_per_token(RouteSpec(61, 8, 256))["stored"] == 61 * 8  # ids 0..255
    assert routes_bytes_per_token(RouteSpec(61, 8, 257))["stored"] == 61 * 8 * 2


def test_decode_sglang_wire_format():
    ids = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]], [[1, 3], [0, 2]]])
    got = decode_routed_experts({"routed_experts": _wire(ids)}, num_tokens=3, spec=SPEC, where="x")
    assert (got.array() == ids).all() and got.dtype == "uint8"


@pytest.mark.parametrize("meta,match", [
    ({}, "--enable-return-routed-experts.*rollout.router: client"),
    ({"routed_experts": [1, 2]}, "base64 string"),
    ({"routed_experts": "@@@"}, "not base64"),
    ({"routed_experts": _wire(np.zeros((2, 2, 2)))}, "expected 3 tokens x 2 layers x top-2"),
    ({"routed_experts": _wire(np.full((3, 2, 2), 4))}, r"outside \[0, 4\)"),
])
def test_decode_refuses_bad_routes(meta, match):
    with pytest.raises(RoutesError, match=match):
        decode_routed_experts(meta, num_tokens=3, spec=SPEC, where="sglang-0: output 0")


def test_route_spec_from_hf_configs():
    tiny = {"num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2}  # transformers 5
    assert RouteSpec.from_hf_config(tiny) == SPEC
    qwen3 = {"num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8}
    assert RouteSpec.from_hf_config(qwen3) == RouteSpec(48, 8, 128)
    vl = {"text_config": qwen3}
    assert RouteSpec.from_hf_config(vl) == RouteSpec(48, 8, 128)
    assert RouteSpec.from_hf_config({"num_hidden_layers": 36}) is None  # dense


def test_parse_sample_with_routes():
    p, r = [5, 6, 7], [9, 10]
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[2, 3], [0, 1]], [[3, 0], [1, 2]]])
    out = {"output_ids": r, "text": "x", "meta_info": {
        "output_token_logprobs": [[-0.5, 9, None], [-0.25, 10, None]],
        "finish_reason": {"type": "stop"}, "weight_version": "3", "routed_experts": _wire(ids)}}
    s = parse_sample(out, group_id=0, prompt_ids=p, answer="", server_name="s", routes=SPEC)
    assert (s.routed_experts.array() == ids).all()
    assert parse_sample(out, group_id=0, prompt_ids=p, answer="", server_name="s").routed_experts \
        is None
    aborted = {**out, "meta_info": {**out["meta_info"], "finish_reason": {"type": "abort"}}}
    del aborted["meta_info"]["routed_experts"]  # partial output: re-issued, never decoded
    assert parse_sample(aborted, group_id=0, prompt_ids=p, answer="", server_name="s",
                        routes=SPEC).routed_experts is None


# ----------------------------------------------------------------------------- the front
def test_refused_behind_sglang_router():
    with pytest.raises(ValueError, match="rollout.router: client"):
        check_routing_replay_front("replay", num_servers=2, router="sglang-router",
                                   router_url=None)
    with pytest.raises(ValueError, match="DRPO_ROUTER_URL=http://r:1.*rollout.router: client"):
        check_routing_replay_front("record", num_servers=1, router="sglang-router",
                                   router_url="http://r:1", router_url_from="DRPO_ROUTER_URL")
    check_routing_replay_front("replay", num_servers=2, router="client", router_url=None)
    check_routing_replay_front("replay", num_servers=1, router="sglang-router", router_url=None)
    check_routing_replay_front("off", num_servers=2, router="sglang-router", router_url="http://r:1")


def test_config_field_and_refusal():
    assert load_config().rollout.routing_replay == "off"
    assert load_config(sets=["rollout.routing_replay=replay"]).rollout.routing_replay == "replay"
    with pytest.raises(ConfigError, match="sglang-router 0.3.2 drops the routed experts"):
        load_config(sets=["rollout.routing_replay=replay", "rollout.num_servers=2"])
    ok = load_config(sets=["rollout.routing_replay=replay", "rollout.num_servers=2",
                           "rollout.router=client"])
    assert ok.rollout.routing_replay == "replay"
    with pytest.raises(ConfigError, match="routing_replay"):
        load_config(sets=["rollout.routing_replay=always"])


def test_preflight_refuses_replay_behind_router_from_environment(tmp_path, monkeypatch):
    from drpo_megatron.run import preflight

    monkeypatch.setenv("DRPO_ROUTER_URL", "http://127.0.0.1:9")
    cfg = load_config(overrides={"output_dir": str(tmp_path / "run")},
                      sets=["rollout.routing_replay=replay"])
    with pytest.raises(ConfigError, match="external sglang-router \\(DRPO_ROUTER_URL="):
        preflight(cfg)


# ----------------------------------------------------------------------------- trainer input
def test_pack_samples_routes_layout():
    a = np.arange(4 * 2 * 2).reshape(4, 2, 2) % 4  # P=3, R=2: 4 rows
    b = (np.arange(2 * 2 * 2).reshape(2, 2, 2) + 1) % 4  # P=2, R=1: 2 rows
    mb = pack_samples([_sample(3, 2, a), _sample(2, 1, b)], pad_id=0, seq_len=6, with_routes=True)
    assert mb.routes.shape == (2, 6, 2, 2) and mb.routes.dtype == torch.int16
    assert (mb.routes[0, :4].numpy() == a).all() and (mb.routes[1, :2].numpy() == b).all()
    filler = torch.tensor([0, 1], dtype=torch.int16).expand(2, 2)
    assert torch.equal(mb.routes[0, 4:], filler.expand(2, 2, 2))  # last token + padding
    assert torch.equal(mb.routes[1, 2:], filler.expand(4, 2, 2))
    assert mb.routes_valid.tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4]
    # the response rows (loss_mask) are engine rows P-1 .. P+R-2
    assert mb.loss_mask[0].nonzero().flatten().tolist() == [2, 3]
    with pytest.raises(ValueError, match="prompt \\+ response - 1 = 4"):
        pack_samples([_sample(3, 2, a[:3])], pad_id=0, with_routes=True)
    with pytest.raises(ValueError, match="carries none"):
        pack_samples([_sample(3, 2)], pad_id=0, with_routes=True)


def test_monitor_routing_metrics_per_layer():
    """Two samples, L=2, K=2; hand-computed disagreement over the response rows."""
    eng0 = np.array([[[0, 1], [2, 3]]] * 2 + [[[0, 1], [2, 3]], [[1, 2], [0, 3]]])  # P=2,R=3
    eng1 = np.array([[[3, 2], [1, 0]]] * 3)                                           # P=2,R=2
    s0, s1 = _sample(2, 3, eng0), _sample(2, 2, eng1)
    s0.rollout_logp = [-1.0, -1.0, -1.0]
    s1.rollout_logp = [-1.0, -1.0]
    # trainer routes of the response rows (rows 1..3 of s0, rows 1..2 of s1), order ignored
    t0 = np.array([[[1, 0], [3, 2]], [[0, 1], [2, 1]], [[2, 1], [3, 0]]])  # row 2: layer 1 differs
    t1 = np.array([[[2, 3], [0, 1]], [[0, 2], [1, 0]]])                   # row 2: layer 0 differs
    logp = [torch.tensor([-1.0, -1.5, -1.0]), torch.tensor([-1.0, -1.25])]
    m = MismatchMonitor(None).measure(1, [s0, s1], logp,
                                      routes=TrainerRoutes(layers=[0, 1], per_sample=[t0, t1]))
    p = "mismatch/moe/"
    assert m[p + "route_mismatch_frac"] == pytest.approx(2 / 10)
    assert m[p + "token_mismatch_frac"] == pytest.approx(2 / 5)
    assert m[p + "layer_0/route_mismatch_frac"] == pytest.approx(1 / 5)
    assert m[p + "layer_1/route_mismatch_frac"] == pytest.approx(1 / 5)
    assert m[p + "layer_1/expert_overlap"] == pytest.approx((4 * 1 + 0.5) / 5)
    assert m[p + "logprob_abs_diff_route_diff"] == pytest.approx((0.5 + 0.25) / 2)
    assert m[p + "logprob_abs_diff_route_same"] == pytest.approx(0.0)
    assert not any(k.startswith(p) for k in MismatchMonitor(None).measure(1, [s0, s1], logp))


def test_rollouts_jsonl_carries_routes(tmp_path):
    ids = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])
    RolloutRecorder(tmp_path).record(1, [_sample(2, 1, ids), _sample(2, 1)])
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert (RoutedExperts.from_json(rows[0]["routed_experts"]).array() == ids).all()
    assert "routed_experts" not in rows[1]
