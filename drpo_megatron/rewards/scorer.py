"""Score a step's samples with the configured reward (``reward.*``, docs/rewards.md).

:class:`RewardScorer` is the loop's reward: ``scorer(samples)`` sets every ``Sample.reward`` and
keeps the step's counts; ``scorer.pop_metrics()`` returns them (and resets):

``rollout/reward/timeout_count``   samples whose call hit its time limit (scored timeout_score)
``rollout/reward/fallback_count``  samples whose call failed (scored fallback_score)
``rollout/reward/<field>``         mean of each numeric extra field of dict results

What a reward function sees of a sample: ``prompt`` = the problem's prompt text (the task's
template filled in, before the tokenizer's chat template; ``Sample.meta["prompt"]``),
``response`` = the decoded response (``Sample.text``), ``meta`` = the example's fields from the
data file (``answer`` and every other jsonl field; ``Sample.meta["task"]``).  Non-score fields of a
dict result are kept on the sample (``Sample.meta["reward_info"]``, in rollouts.jsonl).
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections import defaultdict
from typing import Any, Sequence

from drpo_megatron.rewards.config import RewardConfig
from drpo_megatron.rewards.pool import RewardError, RewardWorkerPool

log = logging.getLogger(__name__)

PROMPT_KEY = "prompt"  # Sample.meta key: the prompt text the reward sees
TASK_KEY = "task"  # Sample.meta key: the example's data-file fields (answer, ...)
INFO_KEY = "reward_info"  # Sample.meta key: the extra fields of a dict result
# an async per-sample call has reward.timeout_s on its event loop; the worker running the chunk
# is killed this much later if the loop itself is blocked (a coroutine that never awaits)
ASYNC_KILL_GRACE_S = 5.0
# failures logged one by one per call (the rest are counted)
MAX_LOGGED_FAILURES = 5


def attach_task(samples: Sequence[Any], problems: Sequence[Any], n: int) -> None:
    """Give group-major ``samples`` (``n`` per problem) the prompt text and data-file fields of
    their problem (``problem.prompt_text``, ``problem.meta``), as the reward sees them."""
    for i, s in enumerate(samples):
        p = problems[i // n]
        s.meta[PROMPT_KEY] = p.prompt_text
        s.meta[TASK_KEY] = dict(getattr(p, "meta", None) or {"answer": p.answer})


def reward_inputs(s: Any) -> tuple[str, str, dict]:
    """``(prompt, response, meta)`` of a sample (``meta`` always has ``answer``)."""
    meta = dict(s.meta.get(TASK_KEY) or {})
    meta.setdefault("answer", s.answer)
    return s.meta.get(PROMPT_KEY, ""), s.text, meta


class RewardScorer:
    """The configured reward as ``scorer(samples)``; see the module docstring."""

    def __init__(self, cfg: RewardConfig, *, probe: bool = True):
        from drpo_megatron.rewards.loader import is_async, load_function
        from drpo_megatron.rewards.math_reward import MATH_VERIFY_SPEC

        self.cfg = cfg
        self.pool = self.http = None
        if cfg.kind == "http":
            from drpo_megatron.rewards.http import HttpReward

            self.name = f"reward.http.url={cfg.http.url!r}"
            self.http = HttpReward(cfg.http)
            if probe:
                self.http.probe()
        else:
            spec = MATH_VERIFY_SPEC if cfg.kind == "math_verify" else cfg.function
            self.name = "math_verify" if cfg.kind == "math_verify" else f"reward.function={spec!r}"
            self.is_async = is_async(load_function(spec))
            self.pool = RewardWorkerPool(spec, cfg.num_workers)
        self._reset()

    def _reset(self) -> None:
        """The counts of the calling thread start again.  Counts are per thread: with
        asynchronous rollouts the producer thread scores training batches while the trainer's
        thread scores the eval set, and each pops its own; the reward calls themselves take
        turns (``_lock``: the worker pool serves one call at a time)."""
        if not hasattr(self, "_lock"):
            self._lock = threading.Lock()
            self._local = threading.local()
        acc = self._local
        acc.sums = defaultdict(float)
        acc.counts = defaultdict(int)
        acc.timeouts = acc.fallbacks = 0

    def _acc(self) -> threading.local:
        if not hasattr(self._local, "sums"):
            self._reset()
        return self._local

    # ------------------------------------------------------------------ calls
    def _function_outcomes(self, inputs: list[tuple[str, str, dict]]) -> list[tuple[str, Any]]:
        c = self.cfg
        if c.batched:
            starts = list(range(0, len(inputs), c.batch_size))
            tasks = [("batch", tuple(map(list, zip(*inputs[s:s + c.batch_size]))),
                      c.timeout_s * len(inputs[s:s + c.batch_size])) for s in starts]
        elif self.is_async:
            starts = list(range(0, len(inputs), c.concurrency))
            tasks = [("many", (c.timeout_s, inputs[s:s + c.concurrency]),
                      c.timeout_s + ASYNC_KILL_GRACE_S) for s in starts]
        else:
            return self.pool.run([("one", args, c.timeout_s) for args in inputs])
        out: list[tuple[str, Any]] = []
        for (mode, payload, limit), (status, value) in zip(tasks, self.pool.run(tasks)):
            size = len(payload[1]) if mode == "many" else len(payload[0])
            if status != "ok":
                why = (f"the call for {size} samples passed its limit of {limit:g} s"
                       if status == "timeout" else value)
                out += [(status, why)] * size
            elif mode == "many":
                out += value
            elif isinstance(value, (list, tuple)) and len(value) == size:
                out += [("ok", v) for v in value]
            else:
                got = f"{len(value)} values" if isinstance(value, (list, tuple)) else repr(value)
                out += [("error", f"the batched call returned {got} for {size} samples; return "
                                  "a list with one number or dict per sample")] * size
        return out

    def __call__(self, samples: Sequence[Any]) -> None:
        """Set ``reward`` (and ``meta["reward_info"]``) of every sample; see the class doc."""
        if not samples:
            return
        c = self.cfg
        inputs = [reward_inputs(s) for s in samples]
        acc = self._acc()
        with self._lock:
            if self.http is not None:
                outcomes = self.http.score(*map(list, zip(*inputs)))
            else:
                outcomes = self._function_outcomes(inputs)
        limit = (f"reward.http.timeout_s={c.http.timeout_s:g} per request"
                 if self.http is not None else f"reward.timeout_s={c.timeout_s:g}")
        timeouts = fallbacks = 0
        for i, (s, (status, value)) in enumerate(zip(samples, outcomes)):
            if status == "ok":
                score, extras, why = _parse_result(value)
                if why is None:
                    s.reward = score
                    if extras:
                        s.meta[INFO_KEY] = extras
                    for k, v in extras.items():
                        if isinstance(v, numbers.Real) and math.isfinite(v):
                            acc.sums[k] += float(v)
                            acc.counts[k] += 1
                    continue
                status, value = "error", why
            where = f"{self.name}: sample {i} (group {s.group_id}, answer {s.answer!r})"
            if status == "timeout":
                timeouts += 1
                s.reward = c.timeout_score
                if timeouts <= MAX_LOGGED_FAILURES:
                    log.warning("%s: time limit (%s)%s: scored reward.timeout_score=%g; "
                                "response %r", where, limit, "" if value is None else f": {value}",
                                c.timeout_score, s.text[:80])
                continue
            if c.on_error == "raise":
                raise RewardError(f"{where}: {value}. Fix the reward, or set reward.on_error: "
                                  "fallback to score such samples reward.fallback_score (counted "
                                  "in rollout/reward/fallback_count)")
            fallbacks += 1
            s.reward = c.fallback_score
            if fallbacks <= MAX_LOGGED_FAILURES:
                log.warning("%s: %s; scored reward.fallback_score=%g", where, value,
                            c.fallback_score)
        acc.timeouts += timeouts
        acc.fallbacks += fallbacks
        if timeouts + fallbacks > c.max_failure_frac * len(samples):
            raise RewardError(
                f"{self.name}: {timeouts} of {len(samples)} samples hit the time limit "
                f"({limit}) and {fallbacks} failed (reward.on_error: fallback): more than "
                f"reward.max_failure_frac={c.max_failure_frac:g} of the call. Fix the reward (or "
                "its server), raise the time limit, or set reward.max_failure_frac: 1.0")

    def pop_metrics(self, prefix: str = "rollout/reward/") -> dict[str, float]:
        """The counts and extra-field means of this thread's calls since its last pop (see the
        module docstring)."""
        acc = self._acc()
        out = {f"{prefix}timeout_count": float(acc.timeouts),
               f"{prefix}fallback_count": float(acc.fallbacks)}
        for k, total in acc.sums.items():
            out[f"{prefix}{k}"] = total / acc.counts[k]
        self._reset()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.http is not None:
            self.http.close()


def _parse_result(value: Any) -> tuple[float, dict, str | None]:
    """``(score, extras, None)`` of a valid result, else ``(nan, {}, why)``."""
    extras: dict = {}
    score = value
    if isinstance(value, dict):
        if "score" not in value:
            return math.nan, {}, (f"returned a dict without 'score' (keys {sorted(value)}); "
                                  "return {'score': number, ...}")
        score = value["score"]
        extras = {k: v for k, v in value.items() if k != "score"}
    if not isinstance(score, numbers.Real):
        return math.nan, {}, (f"returned {score!r} ({type(score).__name__}); a reward is a number "
                              "or {'score': number, ...}")
    if not math.isfinite(score):
        return math.nan, {}, f"returned {score!r}; a reward must be finite"
    return float(score), extras, None


def build_scorer(cfg: RewardConfig, *, probe: bool = True) -> RewardScorer:
    """The scorer of the run's ``reward`` section (checked by ``check_reward_config`` at config
    load).  ``probe``: for ``kind: http``, connect to the server now (the driver rank, before the
    first rollout)."""
    return RewardScorer(cfg, probe=probe)
