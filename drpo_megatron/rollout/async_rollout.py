"""Where each step's batch comes from: generated on demand (``rollout.mode: sync``) or by a
producer thread that keeps the servers busy with the next steps' prompts while the trainer trains
(``rollout.mode: async``, docs/rollout.md "Asynchronous rollouts").

Weight versions.  The trainer pushes version ``s`` after training step ``s`` (version 0 = the
initial policy), so in sync mode step ``s`` trains on samples of version ``s - 1``.  A sample's
*lag* at step ``s`` is ``s - 1 - v`` with ``v`` its oldest token's version
(:meth:`~drpo_megatron.samples.Sample.oldest_version`); ``rollout.max_staleness`` = K bounds it.

The producer generates the batch of step ``t`` only once version ``t - 1 - K`` has been pushed,
so every sample it makes is at most K versions old when step ``t`` trains on it: it runs at most
K + 1 batches ahead of the trainer.  K = 0 is the synchronous schedule (and, seeded, the same
samples).  Generation is one batch at a time, through the same call as sync mode
(``RolloutGenerator.generate_and_score``: dynamic sampling, rewards and overlong included).
Pushes happen in the trainer's thread between steps; the in-flight requests they abort are
re-issued on the new weights, or with ``rollout.partial_rollouts`` continued (rollout/partial.py).

Batches are still checked when the trainer takes them (:func:`enforce_staleness`): a batch
restored from a checkpoint written with a larger K, or under a different mode, can hold groups
older than the current K.  Those are dropped (``rollout.stale_policy: drop``, counted in
``rollout/stale_dropped_groups``) or generated again on the current weights (``regenerate``).
A group goes or stays whole (its advantages are relative to each other).

Checkpoints (:meth:`BatchSource.state_dict`): the data cursor *before* the batch being generated
and every finished batch not trained yet (their samples, rewards and advantages); a resume
trains those first, then generates again from the cursor.  So a kill and resume loses no prompt
and trains none twice: each prompt draw is numbered (``Sample.meta["prompt_index"]``, written to
rollouts.jsonl) and tests check that the trained numbers are each present exactly once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Literal, Sequence

from drpo_megatron.rewards.scorer import PROMPT_KEY, TASK_KEY
from drpo_megatron.samples import Sample

log = logging.getLogger(__name__)

RolloutMode = Literal["sync", "async"]
StalePolicy = Literal["drop", "regenerate"]

#: how long the producer and the trainer wait on each other between checks of the stop flag
POLL_S = 0.5

#: one batch: step -> (samples with rewards and advantages, rollout/ + perf/ metrics)
Produce = Callable[[int], "tuple[list[Sample], dict[str, float]]"]
#: (step, stale groups) -> the same groups generated again on the current weights, scored
Regenerate = Callable[[int, "list[list[Sample]]"], "list[list[Sample]]"]


@dataclass
class Batch:
    """The samples of one step (group-major, group ids 0..) and their sampling metrics."""

    step: int
    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {"step": self.step, "samples": [s.to_state() for s in self.samples],
                "metrics": {k: float(v) for k, v in self.metrics.items()}}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Batch":
        return cls(int(d["step"]), [Sample.from_state(s) for s in d["samples"]],
                   {str(k): float(v) for k, v in d.get("metrics", {}).items()})


def lag(sample: Sample, step: int) -> int:
    """Versions between the weights that trained step ``step`` (``step - 1``) and the oldest
    token of ``sample``."""
    return step - 1 - sample.oldest_version()


def groups_of(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Group-major samples split by ``group_id``, in order."""
    out: list[list[Sample]] = []
    for s in samples:
        if not out or out[-1][0].group_id != s.group_id:
            out.append([])
        out[-1].append(s)
    return out


def enforce_staleness(samples: Sequence[Sample], step: int, max_staleness: int,
                      policy: StalePolicy, regenerate: Regenerate | None = None
                      ) -> tuple[list[Sample], dict[str, float]]:
    """The groups of ``samples`` that step ``step`` may train on under ``max_staleness``.

    A group with any sample whose :func:`lag` exceeds ``max_staleness`` is dropped
    (``policy="drop"``) or replaced by ``regenerate(step, stale_groups)`` (``"regenerate"``).
    Group ids are renumbered 0.. in order.  Returns ``(samples, metrics)`` with
    ``rollout/stale_dropped_groups`` and ``rollout/stale_regenerated_groups``.
    """
    groups = groups_of(samples)
    stale = [i for i, g in enumerate(groups) if max(lag(s, step) for s in g) > max_staleness]
    metrics = {"rollout/stale_dropped_groups": 0.0, "rollout/stale_regenerated_groups": 0.0}
    if stale:
        if policy == "regenerate":
            if regenerate is None:
                raise ValueError("stale_policy regenerate needs a regenerate callback")
            fresh = regenerate(step, [groups[i] for i in stale])
            for i, g in zip(stale, fresh):
                groups[i] = g
            metrics["rollout/stale_regenerated_groups"] = float(len(stale))
        else:
            groups = [g for i, g in enumerate(groups) if i not in set(stale)]
            metrics["rollout/stale_dropped_groups"] = float(len(stale))
        log.warning("step %d: %d of %d groups were more than rollout.max_staleness=%d versions "
                    "old: %s", step, len(stale), len(groups_of(samples)), max_staleness,
                    "generated again" if policy == "regenerate" else "dropped")
    out = []
    for gid, g in enumerate(groups):
        for s in g:
            s.group_id = gid
            out.append(s)
    return out, metrics


def staleness_metrics(samples: Sequence[Sample], step: int) -> dict[str, float]:
    """``rollout/staleness_mean`` / ``_max`` (per sample, of its oldest token) and
    ``rollout/staleness_lag{k}_token_frac``: the fraction of response tokens generated by the
    weights k versions before those that train step ``step``."""
    if not samples:
        return {}
    try:
        lags = [lag(s, step) for s in samples]
        per_token = [step - 1 - v for s in samples for v in s.versions()]
    except ValueError:  # an engine that does not number its weight versions
        return {}
    out = {"rollout/staleness_mean": sum(lags) / len(lags),
           "rollout/staleness_max": float(max(lags))}
    n = max(len(per_token), 1)
    for k in sorted(set(per_token)):
        out[f"rollout/staleness_lag{k}_token_frac"] = sum(1 for t in per_token if t == k) / n
    return out


def problems_of(groups: Sequence[Sequence[Sample]]) -> list[Any]:
    """The problem of each group, rebuilt from its first sample (prompt text, data-file fields,
    answer: what ``attach_task`` and the reward read)."""
    return [SimpleNamespace(prompt_text=g[0].meta.get(PROMPT_KEY, ""), answer=g[0].answer,
                            meta=g[0].meta.get(TASK_KEY)) for g in groups]


class BatchSource:
    """``rollout.mode: sync``: each step's batch is generated when the trainer asks for it.

    ``produce(step)``: the batch of ``step``; ``cursor_state()`` / ``load_cursor(state)``: the
    prompt stream's state.  Batches restored from a checkpoint are served first."""

    mode = "sync"

    def __init__(self, produce: Produce, *, cursor_state: Callable[[], dict],
                 max_staleness: int = 0, stale_policy: StalePolicy = "drop",
                 regenerate: Regenerate | None = None):
        self.produce = produce
        self.cursor_state = cursor_state
        self.max_staleness = max_staleness
        self.stale_policy = stale_policy
        self.regenerate = regenerate
        self.restored: dict[int, Batch] = {}
        self.engine_busy_s = 0.0

    # -------------------------------------------------------------- the trainer's side
    def start(self, first_step: int, last_step: int, version: int) -> None:
        """Called once before the first step."""

    def published(self, version: int) -> None:
        """The trainer pushed ``version`` to the servers."""

    def get(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """The batch of ``step`` within the staleness bound, with its metrics (``perf/`` timing
        included)."""
        t0 = time.time()
        batch = self.restored.pop(step, None)
        if batch is None:
            batch = Batch(step, *self.produce(step))
            self.engine_busy_s += time.time() - t0
        return self._checked(batch, trainer_wait=time.time() - t0)

    def _checked(self, batch: Batch, trainer_wait: float) -> tuple[list[Sample], dict[str, float]]:
        samples, metrics = enforce_staleness(batch.samples, batch.step, self.max_staleness,
                                             self.stale_policy, self.regenerate)
        out = dict(batch.metrics)
        out.update(metrics)
        out.update(staleness_metrics(samples, batch.step))
        out["perf/trainer_wait_s"] = trainer_wait
        return samples, out

    def engine_idle_frac(self, wall_s: float) -> float:
        """Fraction of the last ``wall_s`` seconds the servers spent without a batch to
        generate (sync: everything but the generation itself); resets the busy counter."""
        busy, self.engine_busy_s = self.engine_busy_s, 0.0
        return max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else 0.0

    def close(self) -> None:
        """Stop producing (nothing to stop in sync mode)."""

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The data cursor (the prompt stream's state, before any batch not generated whole)
        and the finished batches not trained yet (``pending_batches``)."""
        return {**self.cursor_state(),
                "pending_batches": [b.to_state() for b in sorted(self.restored.values(),
                                                                  key=lambda b: b.step)]}

    def load_state_dict(self, state: dict[str, Any], load_cursor: Callable[[dict], None]) -> None:
        load_cursor(state)
        self.restored = {b.step: b for b in (Batch.from_state(d)
                                             for d in state.get("pending_batches", []))}
        if self.restored:
            log.info("resuming with %d finished batches not trained yet (steps %s)",
                     len(self.restored), sorted(self.restored))


class AsyncRollouts(BatchSource):
    """``rollout.mode: async``: a producer thread generates the batches of the next steps, at
    most ``max_staleness + 1`` ahead of the trainer (see the module docstring).

    Thread safety: the producer alone calls ``produce`` (and so the prompt stream) while it runs;
    :meth:`state_dict` reads the cursor it saved before the batch in progress."""

    mode = "async"

    def __init__(self, produce: Produce, **kw):
        super().__init__(produce, **kw)
        self._cond = threading.Condition()
        self._ready: dict[int, Batch] = {}
        self._version = 0
        self._next = 1           # the next step the producer generates
        self._last = 0
        self._in_progress: int | None = None
        self._cursor_before: dict | None = None
        self._busy_since: float | None = None  # the batch in progress started (or the window did)
        self._window = time.time()              # start of the engine_idle_frac window
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self, first_step: int, last_step: int, version: int) -> None:
        with self._cond:
            self._ready.update(self.restored)
            self.restored = {}
            self._next = max([first_step] + [s + 1 for s in self._ready])
            self._last = last_step
            self._version = version
        self._thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)
        self._thread.start()

    def published(self, version: int) -> None:
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and self._next <= self._last and \
                            self._version < self._next - 1 - self.max_staleness:
                        self._cond.wait(POLL_S)
                    if self._next > self._last:  # every batch made: stay until close().
                        # Children this thread spawned (reward workers started or replaced by its
                        # calls) carry PR_SET_PDEATHSIG, which fires when the spawning *thread*
                        # exits: they must live as long as the run (the eval still scores).
                        while not self._stop:
                            self._cond.wait(POLL_S)
                    if self._stop:
                        return
                    step = self._in_progress = self._next
                    self._cursor_before = self.cursor_state()
                    self._busy_since = time.time()
                    log.debug("producer: batch of step %d starts at weight version %d", step,
                              self._version)
                samples, metrics = self.produce(step)
                log.debug("producer: batch of step %d done", step)
                with self._cond:
                    self.engine_busy_s += time.time() - max(self._busy_since, self._window)
                    self._busy_since = None
                    self._ready[step] = Batch(step, samples, metrics)
                    self._next = step + 1
                    self._in_progress = self._cursor_before = None
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def get(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        t0 = time.time()
        with self._cond:
            while step not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError(f"the rollout producer stopped before the batch of step "
                                       f"{step}")
                self._cond.wait(POLL_S)
            batch = self._ready.pop(step)
        return self._checked(batch, trainer_wait=time.time() - t0)

    def engine_idle_frac(self, wall_s: float) -> float:
        """Fraction of the time since the last call that the producer had no batch in progress
        (waiting for a weight version, i.e. for the trainer); ``wall_s`` is unused here (the
        producer keeps its own window)."""
        with self._cond:
            now = time.time()
            busy = self.engine_busy_s
            if self._busy_since is not None:  # the batch in progress: busy up to now
                busy += now - max(self._busy_since, self._window)
            window, self._window, self.engine_busy_s = now - self._window, now, 0.0
        return min(1.0, max(0.0, 1.0 - busy / window)) if window > 0 else 0.0

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S * 4)  # a request in flight ends with the servers

    def state_dict(self) -> dict[str, Any]:
        with self._cond:
            cursor = self._cursor_before if self._in_progress is not None else self.cursor_state()
            pending = sorted(self._ready.values(), key=lambda b: b.step)
            return {**cursor, "pending_batches": [b.to_state() for b in pending]}
