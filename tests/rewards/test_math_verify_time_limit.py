"""The per-sample time limit holds for math-verify too: a response whose ``\\boxed{}`` makes sympy
compute for minutes is interrupted (worker killed) and scored ``reward.timeout_score``.

``\\boxed{9^{9^{9}}}``: math-verify parses it as ``9**(9**9)`` and its numeric comparison
evaluates the power exactly, a 1.2-billion-bit integer.  Without any time limit it ran for more
than 15 minutes on this project's 2-core CPU machine (stopped then); the test shows it is still
running after ``STILL_RUNNING_AFTER_S`` and that the reward worker's limit ends it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drpo_megatron.rewards.config import RewardConfig
from drpo_megatron.rewards.scorer import RewardScorer
from drpo_megatron.rollout.engine import Sample

pytestmark = pytest.mark.slow

PATHOLOGICAL = "so the answer is \\boxed{9^{9^{9}}}"
STILL_RUNNING_AFTER_S = 30.0
LIMIT_S = 3.0
ROOT = Path(__file__).resolve().parents[2]


def _sample(text: str, answer: str) -> Sample:
    s = Sample(group_id=0, prompt_ids=[1], response_ids=[2], rollout_logp=[0.0], text=text,
               finish_reason="stop", weight_version="0", answer=answer)
    s.meta["task"] = {"answer": answer}
    return s


@pytest.mark.extended  # why the limit exists (upstream behaviour); the limit itself: the next test
def test_pathological_boxed_answer_runs_for_minutes_without_a_limit():
    code = ("import sys; from drpo_megatron.rewards.math_reward import boxed_math_reward; "
            "boxed_math_reward(sys.argv[1], '3', timeout_s=None)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, PATHOLOGICAL], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=STILL_RUNNING_AFTER_S)
    finally:
        proc.kill()
        proc.wait()


def test_the_time_limit_interrupts_it_and_counts_it():
    sc = RewardScorer(RewardConfig(kind="math_verify", workers=1, timeout_s=LIMIT_S,
                                   timeout_score=-1.0, max_failure_frac=1.0))
    try:
        sc([_sample("\\boxed{3}", "3")])  # workers up (imports are outside any limit)
        t0 = time.monotonic()
        ss = [_sample(PATHOLOGICAL, "3"), _sample("\\boxed{3}", "3"), _sample("\\boxed{4}", "3")]
        sc(ss)
        elapsed = time.monotonic() - t0
        assert [s.reward for s in ss] == [-1.0, 1.0, 0.0]
        assert sc.pool.kills == 1
        assert sc.pop_metrics()["rollout/reward/timeout_count"] == 1
        # the limit plus a replacement worker's start-up (sympy import) on a loaded machine
        assert LIMIT_S <= elapsed < LIMIT_S + 60, elapsed
    finally:
        sc.close()
