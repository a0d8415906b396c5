"""Aggregation over seeds: mean / std / spread curves, per-seed summaries, collapse detection.

Definitions (docs/study.md; the tests hold them to hand-computed values):

* **curve** of a metric for a condition x method: at every step that at least one seed logged
  (finite values only), ``mean``, ``std`` (sample standard deviation, ddof = 1; 0 for a single
  seed), ``min``, ``max`` and ``n`` (seeds contributing).
* **final reward** of a seed: mean of ``rollout/reward_mean`` over its last ``final_window``
  logged steps (all of them when fewer).
* **smoothed reward** at step s: trailing mean of ``rollout/reward_mean`` over the ``smooth``
  logged steps ending at s; defined only once ``smooth`` steps are logged.
* **best reward** of a seed: the maximum of its smoothed reward.
* **step to target**: the first step at which the smoothed reward is >= ``target_reward``
  (None: never).
* **final eval**: the last logged ``eval/accuracy``.
* **collapse**: :class:`drpo_megatron.study.spec.CollapseRule` -- the earliest of a non-finite
  ``loss/policy_loss`` or ``loss/grad_norm`` (the latter only in a run that logs a finite norm
  at some step: with ``optim.grad_clip: 0`` Megatron reports none, logged as NaN), ``patience``
  consecutive logged steps with the reward below
  ``reward_drop`` x running best (once the running best has reached ``reward_floor``), or
  ``patience`` consecutive logged steps with ``rollout/truncated_frac`` > ``truncated_frac``;
  reported at the step the condition started (the first step of the streak).
* cell values over seeds: ``mean ± std`` (ddof = 1) of the per-seed numbers that exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from drpo_megatron.study.spec import Analysis, CollapseRule

__all__ = ["Curve", "Collapse", "SeedSummary", "CellSummary", "mean_std", "aggregate_curve",
           "detect_collapse", "summarize_seed", "summarize_cell", "REWARD", "EVAL", "LOSS",
           "GRAD_NORM", "TRUNCATED", "MISMATCH"]

REWARD = "rollout/reward_mean"
EVAL = "eval/accuracy"
LOSS = "loss/policy_loss"
GRAD_NORM = "loss/grad_norm"
TRUNCATED = "rollout/truncated_frac"
MISMATCH = "mismatch/logprob_abs_diff"

Series = dict[int, float]  # step -> value


def _finite(v: float) -> bool:
    return v is not None and math.isfinite(v)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1; 0 for one value), n)`` of the finite values; NaNs when none."""
    v = [x for x in values if x is not None and _finite(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    if n == 1:
        return m, 0.0, 1
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)), n


@dataclass
class Curve:
    """A metric over steps, aggregated over seeds (lists aligned with ``steps``)."""

    steps: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    min: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    n: list[int] = field(default_factory=list)


def aggregate_curve(per_seed: Sequence[Series]) -> Curve:
    """Align seeds on their logged steps (module docstring); non-finite values are skipped."""
    steps = sorted({s for d in per_seed for s, v in d.items() if _finite(v)})
    c = Curve()
    for s in steps:
        vals = [d[s] for d in per_seed if s in d and _finite(d[s])]
        m, sd, n = mean_std(vals)
        c.steps.append(s)
        c.mean.append(m)
        c.std.append(sd)
        c.min.append(min(vals))
        c.max.append(max(vals))
        c.n.append(n)
    return c


@dataclass
class Collapse:
    step: int
    reason: str  # "non_finite" | "reward" | "no_termination"
    detail: str

    def __str__(self) -> str:
        return f"{self.reason} at step {self.step} ({self.detail})"


def _streak(steps: list[int], flags: list[bool], patience: int) -> Optional[int]:
    """First step of the first run of ``patience`` consecutive True flags."""
    run = 0
    for i, f in enumerate(flags):
        run = run + 1 if f else 0
        if run == patience:
            return steps[i - patience + 1]
    return None


def detect_collapse(scalars: dict[str, Series], rule: CollapseRule) -> Optional[Collapse]:
    """The earliest collapse of one run (module docstring) or None; ``scalars``: metric ->
    {step: value} as logged (``dashboard.data.Run.scalars``)."""
    found: list[Collapse] = []
    for key in (LOSS, GRAD_NORM):
        d = scalars.get(key, {})
        bad = sorted(s for s, v in d.items() if not math.isfinite(v))
        if key == GRAD_NORM and len(bad) == len(d):
            continue  # no finite norm at all: gradient clipping off, Megatron reports none
        if bad:
            found.append(Collapse(bad[0], "non_finite", f"{key} = {scalars[key][bad[0]]}"))
    rew = scalars.get(REWARD, {})
    steps = sorted(s for s in rew if _finite(rew[s]))
    best = -math.inf
    flags, bests = [], []
    for s in steps:
        best = max(best, rew[s])
        bests.append(best)
        flags.append(best >= rule.reward_floor and rew[s] < rule.reward_drop * best)
    s0 = _streak(steps, flags, rule.patience)
    if s0 is not None:
        b = bests[steps.index(s0)]
        found.append(Collapse(s0, "reward", f"{REWARD} below {rule.reward_drop:g} x running best "
                                            f"{b:.3g} for {rule.patience} steps"))
    tr = scalars.get(TRUNCATED, {})
    tsteps = sorted(s for s in tr if _finite(tr[s]))
    s0 = _streak(tsteps, [tr[s] > rule.truncated_frac for s in tsteps], rule.patience)
    if s0 is not None:
        found.append(Collapse(s0, "no_termination", f"{TRUNCATED} > {rule.truncated_frac:g} for "
                                                    f"{rule.patience} steps"))
    order = {"non_finite": 0, "reward": 1, "no_termination": 2}
    return min(found, key=lambda c: (c.step, order[c.reason])) if found else None


def _smoothed(series: Series, k: int) -> list[tuple[int, float]]:
    steps = sorted(s for s in series if _finite(series[s]))
    vals = [series[s] for s in steps]
    return [(steps[i], sum(vals[i - k + 1:i + 1]) / k) for i in range(k - 1, len(steps))]


@dataclass
class SeedSummary:
    seed: int
    last_step: Optional[int]
    final_reward: float
    best_reward: float
    final_eval: float
    step_to_target: Optional[int]
    collapse: Optional[Collapse]
    mismatch_mean: float  # mean of mismatch/logprob_abs_diff over the logged steps


def summarize_seed(seed: int, scalars: dict[str, Series], analysis: Analysis) -> SeedSummary:
    rew = scalars.get(REWARD, {})
    rsteps = sorted(s for s in rew if _finite(rew[s]))
    tail = [rew[s] for s in rsteps[-analysis.final_window:]]
    final = sum(tail) / len(tail) if tail else math.nan
    sm = _smoothed(rew, analysis.smooth)
    best = max((v for _, v in sm), default=math.nan)
    target = next((s for s, v in sm if v >= analysis.target_reward), None)
    ev = scalars.get(EVAL, {})
    esteps = sorted(s for s in ev if _finite(ev[s]))
    mm = [v for v in scalars.get(MISMATCH, {}).values() if _finite(v)]
    all_steps = sorted({s for d in scalars.values() for s in d})
    return SeedSummary(seed=seed, last_step=all_steps[-1] if all_steps else None,
                       final_reward=final, best_reward=best,
                       final_eval=ev[esteps[-1]] if esteps else math.nan,
                       step_to_target=target, collapse=detect_collapse(scalars, analysis.collapse),
                       mismatch_mean=sum(mm) / len(mm) if mm else math.nan)


@dataclass
class CellSummary:
    """A condition x method over its seeds (``(mean, std, n)`` tuples from :func:`mean_std`)."""

    condition: str
    method: str
    seeds: list[SeedSummary]
    final_reward: tuple[float, float, int]
    best_reward: tuple[float, float, int]
    final_eval: tuple[float, float, int]
    mismatch_mean: tuple[float, float, int]

    @property
    def steps_to_target(self) -> list[Optional[int]]:
        return [s.step_to_target for s in self.seeds]

    @property
    def collapses(self) -> int:
        return sum(s.collapse is not None for s in self.seeds)


def summarize_cell(condition: str, method: str, seeds: list[SeedSummary]) -> CellSummary:
    return CellSummary(condition, method, seeds,
                       final_reward=mean_std([s.final_reward for s in seeds]),
                       best_reward=mean_std([s.best_reward for s in seeds]),
                       final_eval=mean_std([s.final_eval for s in seeds]),
                       mismatch_mean=mean_std([s.mismatch_mean for s in seeds]))
