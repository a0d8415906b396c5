"""Routing replay (R3) against a real SGLang 0.5.23 CPU server and a real sglang-router 0.3.2.

* The server (launched with --enable-return-routed-experts through drpo's CPU layer) returns,
  through drpo's client-side fleet, every forwarded token's experts; drpo's decoder reads exactly
  what SGLang's own decoder (``extract_routed_experts_from_meta_info``) reads; the prompt's routes
  of the samples of one prompt are the same (the prefix cache serves them).
* sglang-router 0.3.2 drops the field: the reason routing replay is refused behind it (if this
  test fails because the router keeps the routes, the refusal in rollout/routes.py can go).
* The real actor on the real engine's routes (MXFP4-emulated rollout weights, where routing
  differs): with replay every router call uses the engine's experts on every row the engine ran
  (checked by a hook on Megatron's TopKRouter in tests/parallel/routing_replay_worker.py, forward
  and activation recompute), record shows the disagreement, and |log π − log µ| is lower with
  replay than without on the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU server path")]

HERE = Path(__file__).resolve().parent
ENGINE = HERE / "routes_engine_worker.py"
ACTOR = HERE.parent / "parallel" / "routing_replay_worker.py"


def _engine(policy: Path, precision: str, out: Path, *extra: str) -> dict:
    run_python([ENGINE, policy, precision, out, *extra], timeout=900)
    return json.loads((out / "engine.json").read_text())


def test_server_returns_routes_sglang_decoder_agrees_router_drops_them(policy, tmp_path):
    res = _engine(policy, "bf16", tmp_path, "router")
    assert res["spec"] == [2, 2, 4]
    assert res["num_samples"] == 16 and res["rows_ok"]  # prompt + response - 1 rows each
    assert res["prompt_routes_shared"]
    assert res["decoder"] and all(d["equal"] for d in res["decoder"])
    assert res["router_keeps_routes"] is False, (
        "sglang-router passes routed_experts through now: drop check_routing_replay_front")
    assert "output_token_logprobs" in res["router_meta_keys"]  # the rest of meta_info survives


@pytest.mark.extended  # the drpo train e2e (tests/e2e/test_routing_replay_e2e.py) covers it
def test_actor_replays_real_engine_routes(policy, tmp_path):
    eng = _engine(policy, "mxfp4_emulated", tmp_path)
    samples = tmp_path / "samples.pkl"
    runs = {}
    for mode, recompute in (("off", "none"), ("record", "none"), ("replay", "full")):
        out = tmp_path / f"{mode}.json"
        run_python([ACTOR, policy, "single", mode, out, recompute, samples], timeout=600)
        runs[mode] = json.loads(out.read_text())
    assert eng["rows_ok"]
    rep, rec, off = runs["replay"], runs["record"], runs["off"]
    fwd, recomputed = rep["checks"]["forward"], rep["checks"]["recompute"]
    assert fwd[0] > 0 and fwd[0] == fwd[1] and rep["checks"]["response_rows"] > 0
    assert recomputed[0] > 0 and recomputed[0] == recomputed[1]
    assert rep["recorded_equals_engine"] and rep["state_clear"] and rep["router_grad_abs"] > 0
    p = "mismatch/moe/"
    assert rec["mismatch"][p + "route_mismatch_frac"] > 0, rec["mismatch"]
    assert rep["mismatch"][p + "route_mismatch_frac"] == 0.0
    assert rec["mismatch"]["mismatch/logprob_abs_diff"] == off["mismatch"]["mismatch/logprob_abs_diff"]
    assert rep["mismatch"]["mismatch/logprob_abs_diff"] < off["mismatch"]["mismatch/logprob_abs_diff"]
