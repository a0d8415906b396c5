"""Aggregation over seeds and collapse detection against hand-computed values."""

from __future__ import annotations

import math

import pytest

from drpo_megatron.study.aggregate import (EVAL, GRAD_NORM, LOSS, MISMATCH, REWARD, TRUNCATED,
                                           aggregate_curve, detect_collapse, mean_std,
                                           summarize_cell, summarize_seed)
from drpo_megatron.study.spec import Analysis, CollapseRule

NAN, INF = float("nan"), float("inf")
RULE = CollapseRule(reward_floor=0.2, reward_drop=0.5, patience=10, truncated_frac=0.5)


def test_mean_std_sample_std():
    m, sd, n = mean_std([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; / (4 - 1) -> sqrt(5/3)
    assert (m, n) == (2.5, 4) and sd == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([0.7, NAN, None]) == (0.7, 0.0, 1)  # one finite value: std 0
    m, sd, n = mean_std([NAN])
    assert n == 0 and math.isnan(m) and math.isnan(sd)


def test_curve_aligns_seeds_on_steps():
    seeds = [{1: 0.2, 2: 0.4, 3: 0.6}, {1: 0.4, 2: 0.8}, {1: NAN, 3: 0.3, 5: 1.0}]
    c = aggregate_curve(seeds)
    assert c.steps == [1, 2, 3, 5]
    assert c.n == [2, 2, 2, 1]
    # step 1: (0.2, 0.4) -> 0.3 ± sqrt(((-.1)^2 + .1^2) / 1) = 0.141421
    # step 2: (0.4, 0.8) -> 0.6 ± 0.282843; step 3: (0.6, 0.3) -> 0.45 ± 0.212132; step 5: 1.0 ± 0
    assert c.mean == pytest.approx([0.3, 0.6, 0.45, 1.0])
    assert c.std == pytest.approx([0.1414214, 0.2828427, 0.2121320, 0.0], abs=1e-6)
    assert c.min == pytest.approx([0.2, 0.4, 0.3, 1.0])
    assert c.max == pytest.approx([0.4, 0.8, 0.6, 1.0])
    assert aggregate_curve([]).steps == [] and aggregate_curve([{}, {}]).steps == []


def _reward(values, start=1):
    return {REWARD: {start + i: v for i, v in enumerate(values)}}


RISE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.55, 0.5, 0.45, 0.4]  # steps 1-10, running best 0.6


def test_reward_collapse_is_ten_steps_below_half_the_running_best():
    # steps 11-20 at 0.25 < 0.5 * 0.6 = 0.3: the streak starts at step 11
    got = detect_collapse(_reward(RISE + [0.25] * 10), RULE)
    assert got is not None and (got.step, got.reason) == (11, "reward")
    assert "0.6" in got.detail
    # nine low steps only: no collapse (then a recovery breaks the streak)
    assert detect_collapse(_reward(RISE + [0.25] * 9 + [0.35] + [0.25] * 9), RULE) is None
    # exactly half is not below half
    assert detect_collapse(_reward(RISE + [0.3] * 12), RULE) is None
    # the running best never reached the floor 0.2: a drop from 0.15 to 0.01 is no collapse
    assert detect_collapse(_reward([0.15] * 3 + [0.01] * 20), RULE) is None
    # the streak counts logged steps: steps 2, 4, ..., the 10 low ones are 22..40 -> step 22
    sparse = {REWARD: {2 * (i + 1): v for i, v in enumerate(RISE + [0.1] * 10)}}
    assert detect_collapse(sparse, RULE).step == 22
    # the running best includes later highs: best 0.9 at step 12, then 10 steps at 0.4 < 0.45
    got = detect_collapse(_reward(RISE + [0.8, 0.9] + [0.4] * 10), RULE)
    assert got.step == 13


def test_non_finite_and_no_termination():
    s = _reward(RISE + [0.25] * 10)  # reward collapse at 11
    s[LOSS] = {i: 0.1 for i in range(1, 21)}
    s[LOSS][7] = NAN
    got = detect_collapse(s, RULE)
    assert (got.step, got.reason) == (7, "non_finite") and "loss/policy_loss" in got.detail
    # grad norm: an inf after finite norms counts; all-NaN (grad clipping off) does not
    s = _reward(RISE)
    s[GRAD_NORM] = {i: NAN for i in range(1, 11)}
    assert detect_collapse(s, RULE) is None
    s[GRAD_NORM] = {i: 1.0 for i in range(1, 11)}
    s[GRAD_NORM][9] = INF
    assert (detect_collapse(s, RULE).step, detect_collapse(s, RULE).reason) == (9, "non_finite")
    # responses no longer terminating: truncated_frac > 0.5 for 10 steps from step 5
    s = _reward(RISE * 2)
    s[TRUNCATED] = {i: (0.9 if 5 <= i <= 14 else 0.0) for i in range(1, 21)}
    got = detect_collapse(s, RULE)
    assert (got.step, got.reason) == (5, "no_termination")
    s[TRUNCATED] = {i: (0.5 if 5 <= i <= 14 else 0.0) for i in range(1, 21)}  # not above 0.5
    assert detect_collapse(s, RULE) is None
    # ties on the step: non_finite is reported first
    s = _reward(RISE + [0.25] * 10)
    s[LOSS] = {11: NAN}
    assert detect_collapse(s, RULE).reason == "non_finite"


def test_seed_and_cell_summaries():
    a = Analysis(final_window=3, smooth=2, target_reward=0.4)
    s1 = {REWARD: {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, 6: 0.6},
          EVAL: {0: 0.3, 3: 0.5, 6: 0.7}, MISMATCH: {1: 1e-3, 2: 3e-3, 3: NAN}}
    got = summarize_seed(1, s1, a)
    assert got.final_reward == pytest.approx(0.5)   # (0.4 + 0.5 + 0.6) / 3
    # 2-step means at steps 2..6: 0.15 0.25 0.35 0.45 0.55 -> best 0.55, >= 0.4 first at step 5
    assert got.best_reward == pytest.approx(0.55)
    assert got.step_to_target == 5
    assert got.final_eval == 0.7 and got.last_step == 6
    assert got.mismatch_mean == pytest.approx(2e-3)
    assert got.collapse is None
    s2 = {REWARD: {1: 0.7, 2: 0.9}}                  # shorter than final_window: all steps
    g2 = summarize_seed(2, s2, a)
    assert g2.final_reward == pytest.approx(0.8) and g2.best_reward == pytest.approx(0.8)
    assert g2.step_to_target == 2 and math.isnan(g2.final_eval)
    g3 = summarize_seed(3, {REWARD: {1: 0.9}}, a)    # one step < smooth: no smoothed value
    assert g3.step_to_target is None and math.isnan(g3.best_reward)
    cell = summarize_cell("bf16", "drpo", [got, g2, g3])
    # final rewards 0.5, 0.8, 0.9 -> 0.7333 ± sqrt((0.0544 + 0.0044 + 0.0278) / 2) = 0.2082
    assert cell.final_reward[0] == pytest.approx(0.7333333) and cell.final_reward[2] == 3
    assert cell.final_reward[1] == pytest.approx(0.2081666, abs=1e-6)
    assert cell.best_reward[:2] == pytest.approx((0.675, 0.1767767))  # 0.55, 0.8 (g3: none)
    assert cell.final_eval == (0.7, 0.0, 1)
    assert cell.steps_to_target == [5, 2, None] and cell.collapses == 0
