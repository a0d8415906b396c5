"""MegatronActor.train_step under TP2 / PP2 / EP2 / DP2 (distributed optimizer) equals one process.

The real actor (bridge load of a tiny Qwen3-MoE checkpoint made here, Megatron schedule, DDP,
Megatron optimizer, chunked vocab-parallel log-probs) trains 2 Adam steps on the same 8 samples
under each 2-rank layout (torchrun, gloo) and in one process.  Per-step loss and grad norm must
agree.  In the DP layouts (EP2 is EP2 x DP2 for dense params; DP2 uses the distributed
optimizer) each rank trains on its half of the samples and the loss denominators are
all-reduced: a rank-local denominator would change the loss by ~2x, not 1e-7.

Tolerance: the layouts change only the order of fp32 reductions (TP row-parallel partial sums,
the vocab-parallel max / sum-exp, the MoE combine, the DP gradient all-reduce, the 4 -> 2+2
micro-batch split).  Each reordering costs ~1 ulp (6e-8 relative); through 2 layers and two
Adam steps we measured <= 5e-7 relative.  ``RTOL = 1e-5`` keeps a 20x margin and still catches
a wrong denominator, a lost shard or a missing gradient sync (>= 1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python

from drpo_megatron.dist import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "actor_parallel_worker.py"
MAKE_HF = ROOT / "tests" / "platform" / "megatron_dist_worker.py"
RTOL = 1e-5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="sized for the CPU path")]


def _run(args, timeout):
    run_python(args, timeout)


def _port():
    return free_port()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("actor_parallel")
    _run([MAKE_HF, "make-hf", d / "hf"], timeout=180)
    return d / "hf"


@pytest.fixture(scope="module")
def single(hf_dir):
    out = hf_dir.parent / "single.json"
    _run([WORKER, hf_dir, "single", out], timeout=300)
    return json.loads(out.read_text())


def test_single_process_chunked_logprobs_equal_logits_path(single):
    assert single["logp_lengths_ok"]
    assert single["logp_chunked_vs_logits"] < 2e-5  # fp32 log-softmax reordering
    step1 = single["steps"][0]
    ref = single["logits_path_step1"]
    assert step1["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert step1["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2", "dp2", "ep2_distopt"])
def test_layout_equals_single_process(hf_dir, single, layout):
    out = hf_dir.parent / f"{layout}.json"
    _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
          "--master-addr", "127.0.0.1", "--master-port", str(_port()), WORKER, hf_dir, layout, out],
         timeout=300)
    res = json.loads(out.read_text())
    assert res["dp"] == (2 if layout in ("ep2", "dp2", "ep2_distopt") else 1)
    assert len(res["steps"]) == len(single["steps"])
    for got, ref in zip(res["steps"], single["steps"]):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), (layout, res, single)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), (layout, res, single)
