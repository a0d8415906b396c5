"""One rollout step's batch: generate, reward, overlong handling and DAPO dynamic sampling.

:func:`generate_scored_groups` is boxes 1 and 2 of the loop (generate, then reward) as one call,
because dynamic sampling must see the rewards to decide whether to generate more.  It is pure
except for its three callbacks (the next prompts, the generate call, the reward function), so the
whole policy is unit-testable without a server.

Per round (``rollout.*`` fields, see :class:`drpo_megatron.config.RolloutConfig`):

1. ``need`` = groups still missing; ask ``next_prompts`` for ``need`` prompts, or
   ``ceil(oversample_factor * need)`` when ``dynamic_filter`` is on, and generate
   ``samples_per_prompt`` samples for each (one *group* per prompt).
2. Reward every sample, then apply ``overlong`` (on the final reward, so the filter and the
   advantages see the same number):

   * ``keep``: truncated responses (``finish_reason == "length"``) are trained on as they are.
   * ``filter``: truncated responses stay in their group (their reward enters the group baseline)
     but are excluded from the loss: ``Sample.in_loss = False`` masks their tokens out of the
     per-token loss and out of the aggregation denominators (DAPO's overlong filtering).
   * ``penalty``: DAPO's soft overlong punishment, added to the reward of *every* response by
     length L (``L_max = max_new_tokens``, ``B = overlong_buffer``, ``P = overlong_penalty``):
     0 for ``L <= L_max - B``, ``-P * (L - (L_max - B)) / B`` inside the buffer, so ``-P`` at
     ``L = L_max``.

3. With ``dynamic_filter``, a group whose final rewards are all equal is dropped: its advantages
   are all zero under a group baseline, so it carries no gradient and only dilutes the loss
   denominators (DAPO's dynamic sampling).  Groups are kept in generation order; surplus
   informative groups beyond ``prompts_per_step`` are discarded (as DAPO does).

Rounds repeat until ``prompts_per_step`` groups are kept (DAPO: keep sampling until the batch is
full), at most ``max_rounds`` times (0 = no limit).  When the rounds are exhausted,
``on_exhausted`` decides: ``raise`` (default, as verl's ``max_num_gen_batches``) raises
:class:`DynamicSamplingExhausted` naming the counts and the fixes; ``fill`` tops the batch up
with the filtered (all-equal) groups, in generation order, and logs ``rollout/filled_groups``
(those groups have zero advantage: the step trains on fewer informative groups but keeps its
shape).

The returned batch always holds exactly ``prompts_per_step`` groups of ``samples_per_prompt``
samples, group-major, with ``group_id`` renumbered ``0 .. prompts_per_step - 1`` (what
``assign_advantages`` and the mini-batch split assume); the generation-time group index is kept
in ``Sample.meta["generated_group"]``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, get_args, Literal, Sequence

from drpo_megatron.errors import RuntimeFailure
from drpo_megatron.rollout.engine import Sample

__all__ = ["OVERLONG_MODES", "ON_EXHAUSTED", "DynamicSamplingExhausted", "apply_overlong", "check_sampling_config",
           "overlong_penalty", "generate_scored_groups"]

#: rollout.overlong: what happens to responses cut at max_new_tokens (:func:`apply_overlong`)
OverlongMode = Literal["keep", "filter", "penalty"]
#: rollout.on_exhausted: what dynamic sampling does after max_rounds rounds
OnExhausted = Literal["raise", "fill"]
OVERLONG_MODES = get_args(OverlongMode)
ON_EXHAUSTED = get_args(OnExhausted)

# (k) -> (prompts [k][ids], answers [k])
NextPrompts = Callable[[int], "tuple[list[list[int]], list[str]]"]
# (prompts, answers, first_group) -> len(prompts) * n samples, group-major; ``first_group`` is the
# step-local index of prompts[0] among all prompts generated this step (distinct sampling seeds)
Generate = Callable[[Sequence[list[int]], Sequence[str], int], "list[Sample]"]
Score = Callable[[Sequence[Sample]], None]


class DynamicSamplingExhausted(RuntimeFailure):
    """``rollout.max_rounds`` rounds did not yield ``prompts_per_step`` informative groups."""


def check_sampling_config(cfg: Any) -> None:
    """ValueError naming the ``rollout.*`` field, the value and the fix (config validation)."""
    if cfg.oversample_factor < 1.0:
        raise ValueError(f"rollout.oversample_factor={cfg.oversample_factor} must be >= 1 (each "
                         "round asks for ceil(factor * missing groups) prompts)")
    if cfg.max_rounds < 0:
        raise ValueError(f"rollout.max_rounds={cfg.max_rounds} must be >= 0 (0 = no limit)")
    if cfg.on_exhausted not in ON_EXHAUSTED:
        raise ValueError(f"rollout.on_exhausted={cfg.on_exhausted!r}: choose one of "
                         f"{list(ON_EXHAUSTED)}")
    if cfg.overlong not in OVERLONG_MODES:
        raise ValueError(f"rollout.overlong={cfg.overlong!r}: choose one of {list(OVERLONG_MODES)}")
    if cfg.overlong == "penalty":
        if not 1 <= cfg.overlong_buffer <= cfg.max_new_tokens:
            raise ValueError(f"rollout.overlong_buffer={cfg.overlong_buffer} must be in [1, "
                             f"rollout.max_new_tokens={cfg.max_new_tokens}] for overlong: penalty")
        if cfg.overlong_penalty < 0:
            raise ValueError(f"rollout.overlong_penalty={cfg.overlong_penalty} must be >= 0 (the "
                             "reward at max_new_tokens is -overlong_penalty)")


def overlong_penalty(length: int, *, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment of a response of ``length`` tokens (<= 0)."""
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(length - start, buffer) / buffer


def apply_overlong(samples: Sequence[Sample], cfg: Any) -> None:
    """Apply ``cfg.overlong`` to scored samples in place (see the module docstring)."""
    mode = cfg.overlong
    if mode == "keep":
        return
    if mode == "filter":
        for s in samples:
            if s.finish_reason == "length":
                s.in_loss = False
        return
    if mode == "penalty":
        for s in samples:
            p = overlong_penalty(s.num_response_tokens, max_new_tokens=cfg.max_new_tokens,
                                 buffer=cfg.overlong_buffer, penalty=cfg.overlong_penalty)
            s.meta["overlong_penalty"] = p
            s.reward += p
        return
    raise ValueError(f"rollout.overlong={mode!r}: choose one of {list(OVERLONG_MODES)}")


def _groups(samples: Sequence[Sample], n: int, first_group: int, k: int) -> list[list[Sample]]:
    if len(samples) != k * n:
        raise ValueError(f"generate returned {len(samples)} samples for {k} prompts x n={n}")
    groups = [list(samples[i * n:(i + 1) * n]) for i in range(k)]
    for g, grp in enumerate(groups):
        ids = {s.group_id for s in grp}
        if ids != {first_group + g}:
            raise ValueError(f"generate returned samples out of group-major order: group "
                             f"{first_group + g} holds group ids {sorted(ids)}")
    return groups


def generate_scored_groups(cfg: Any, *, next_prompts: NextPrompts, generate: Generate,
                           score: Score) -> tuple[list[Sample], dict[str, float]]:
    """Boxes 1 + 2 of a step: ``cfg.prompts_per_step`` scored groups (see the module docstring).

    ``cfg`` is a :class:`~drpo_megatron.config.RolloutConfig` (or anything with its fields).
    Returns ``(samples, metrics)``: ``prompts_per_step * samples_per_prompt`` samples, group-major,
    group ids ``0 ..``; metrics ``rollout/{kept,filtered,filled}_groups``,
    ``rollout/generation_rounds``, ``rollout/prompts_generated``,
    ``rollout/overlong_excluded_frac``, ``rollout/overlong_penalty_mean`` and the time spent in
    generate (``perf/rollout_time_s``) and reward (``perf/reward_time_s``).
    """
    needed, n = cfg.prompts_per_step, cfg.samples_per_prompt
    dynamic = cfg.dynamic_filter
    kept: list[list[Sample]] = []
    dropped: list[list[Sample]] = []
    rounds = generated = 0
    t_gen = t_score = 0.0
    while len(kept) < needed and (cfg.max_rounds == 0 or rounds < cfg.max_rounds):
        need = needed - len(kept)
        k = math.ceil(cfg.oversample_factor * need) if dynamic else need
        prompts, answers = next_prompts(k)
        t0 = time.time()
        samples = generate(prompts, answers, generated)
        t_gen += time.time() - t0
        groups = _groups(samples, n, generated, k)
        t0 = time.time()
        score(samples)
        apply_overlong(samples, cfg)
        t_score += time.time() - t0
        for grp in groups:
            rewards = [s.reward for s in grp]
            (dropped if dynamic and min(rewards) == max(rewards) else kept).append(grp)
        generated += k
        rounds += 1
    filled = 0
    if len(kept) < needed:
        if cfg.on_exhausted != "fill":
            raise DynamicSamplingExhausted(
                f"dynamic sampling: {len(kept)} of rollout.prompts_per_step={needed} groups with "
                f"non-equal rewards after rollout.max_rounds={cfg.max_rounds} rounds ({generated} "
                f"prompts generated, {len(dropped)} groups had all-equal rewards). Fix: raise "
                "rollout.max_rounds (0 = no limit) or rollout.oversample_factor, use easier/harder "
                "prompts, or set rollout.on_exhausted: fill to top the batch up with all-equal "
                "groups (zero advantage)")
        filled = needed - len(kept)
        kept.extend(dropped[:filled])
    batch: list[Sample] = []
    for g, grp in enumerate(kept[:needed]):
        for s in grp:
            s.meta["generated_group"] = s.group_id
            s.group_id = g
            batch.append(s)
    total = max(len(batch), 1)
    metrics = {
        "rollout/kept_groups": float(min(len(kept), needed) - filled),
        "rollout/filtered_groups": float(len(dropped)),
        "rollout/filled_groups": float(filled),
        "rollout/generation_rounds": float(rounds),
        "rollout/prompts_generated": float(generated),
        "rollout/overlong_excluded_frac": sum(not s.in_loss for s in batch) / total,
        "rollout/overlong_penalty_mean": sum(s.meta.get("overlong_penalty", 0.0)
                                             for s in batch) / total,
        "perf/rollout_time_s": t_gen,
        "perf/reward_time_s": t_score,
    }
    return batch, metrics
