"""Routing replay (R3) in the real MegatronActor: every router uses the engine's experts, checked
from inside the MoE layers, under TP2 + sequence parallelism, PP2 (1F1B), EP2 (all-to-all) and
activation recompute, and each layout gives the single-process step.

``routing_replay_worker.py`` (see its docstring) builds the actor with ``routing_replay=replay``
on a tiny Qwen3-MoE checkpoint, gives the samples synthetic engine routes (random experts, which
the trainer's own router would mostly not pick), runs the mismatch forward and one step of two
mini-batch updates (several micro-batches each), and checks every call of every ``TopKRouter``
(its returned ``routing_map``, forward and recomputation) against the routes expected from the
samples alone.

Tolerance of the layout comparison: as tests/parallel/test_actor_parallel.py (the layouts change
only the order of fp32 reductions; measured <= 5e-7 relative), ``RTOL = 1e-5``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python, torchrun_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "routing_replay_worker.py"
MAKE_HF = ROOT / "tests" / "platform" / "megatron_dist_worker.py"
RTOL = 1e-5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="sized for the CPU path")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("routing_replay")
    run_python([MAKE_HF, "make-hf", d / "hf"], timeout=180)
    return d / "hf"


def _run(hf_dir: Path, layout: str, mode: str, recompute: str = "none") -> dict:
    out = hf_dir.parent / f"{layout}-{mode}-{recompute}.json"
    args = [WORKER, hf_dir, layout, mode, out, recompute]
    if layout != "single":
        args = [*torchrun_args(2), *args]
    run_python(args, timeout=600)
    return json.loads(out.read_text())


def _assert_replayed(res: dict) -> None:
    """Every rank: every router call (forward and recompute) used the engine's experts on every
    row the engine ran; the capture for the mismatch metrics saw them too; a clean state after
    the step; the router still got a gradient."""
    for r in res["ranks"]:
        fwd, rec = r["checks"]["forward"], r["checks"]["recompute"]
        assert fwd[0] > 0 and fwd[0] == fwd[1], r["checks"]
        assert rec[0] == rec[1], r["checks"]
        assert r["checks"]["response_rows"] > 0
        assert r["recorded_equals_engine"], r
        assert r["state_clear"], r
        assert r["router_grad_abs"] > 0, r


@pytest.fixture(scope="module")
def single(hf_dir):
    return _run(hf_dir, "single", "replay")


def test_single_process_replays_every_token(hf_dir, single):
    _assert_replayed(single)
    # 3 passes (mismatch forward, 2 updates) x 4 micro-batches x 2 layers, no recomputation
    assert single["ranks"][0]["checks"]["calls"] == [16, 0]
    off = _run(hf_dir, "single", "off")
    # the replayed (random) experts change the forward: π and the updates differ from off
    assert off["logp_sum"] != pytest.approx(single["logp_sum"], rel=1e-6)
    assert off["steps"][0]["loss"] != pytest.approx(single["steps"][0]["loss"], rel=1e-6)


def test_recompute_replays_the_same_routes(hf_dir, single):
    full = _run(hf_dir, "single", "replay", "full")
    _assert_replayed(full)
    # every update's micro-batch is recomputed once in its backward, through the same experts
    assert full["ranks"][0]["checks"]["calls"] == [16, 8]
    assert full["ranks"][0]["checks"]["recompute"][0] > 0
    assert full["steps"][0]["loss"] == pytest.approx(single["steps"][0]["loss"], rel=RTOL)
    assert full["steps"][0]["grad_norm"] == pytest.approx(single["steps"][0]["grad_norm"], rel=RTOL)


# tp2: sequence parallel (each TP rank replays its slice of the sequence) with recomputation;
# pp2: 1F1B with recomputation (a stage runs the next micro-batch's forward before the previous
# one's backward: the recomputation must pop that micro-batch's routes, not the latest ones);
# ep2: EP2 x DP2, all-to-all dispatcher (each DP rank replays its own samples; padding rows get
# the filler experts)
@pytest.mark.parametrize("layout,recompute", [
    ("tp2", "full"), ("pp2", "full"),
    # EP2 x DP2: the all-to-all path; long (4 ranks' worth of work on 2 cores): -m extended
    pytest.param("ep2", "none", marks=pytest.mark.extended)])
def test_layout_replays_and_equals_single_process(hf_dir, single, layout, recompute):
    res = _run(hf_dir, layout, "replay", recompute)
    _assert_replayed(res)
    if recompute == "full":
        assert all(r["checks"]["recompute"][0] > 0 for r in res["ranks"])
    # the ranks together checked what the single process checked (TP splits the sequence,
    # PP the layers, DP the update's samples; the mismatch forward runs every sample on every
    # DP rank)
    assert res["logp_sum"] == pytest.approx(single["logp_sum"], rel=RTOL)
    for got, ref in zip(res["steps"], single["steps"]):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), (layout, got, ref)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), (layout, got, ref)
