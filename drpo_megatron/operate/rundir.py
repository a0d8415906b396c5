"""The run directory: the resolved config, logs, the per-sample record and progress display.

``<output_dir>/config.yaml`` (resolved, rank 0), ``logs/trainer.log`` (rank 0;
``logs/trainer-rank<r>.log`` for the others), ``rollouts.jsonl`` (every sample of every step:
ids, µ, reward, advantage, weight version; :class:`RolloutRecorder`).  :class:`Progress` is the
tqdm bar and the one-line step summary in the log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from tqdm import tqdm

from drpo_megatron.samples import Sample

log = logging.getLogger("drpo")


def setup_run_dir(output_dir: str, resolved: dict[str, Any]) -> Path:
    """Create ``output_dir`` with ``config.yaml`` (``resolved``) and the trainer's log file
    handler (rank 0: ``logs/trainer.log``; rank r: ``logs/trainer-rank<r>.log``)."""
    run_dir = Path(output_dir).expanduser().resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # before the process group exists
    if rank == 0:
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    fh = logging.FileHandler(run_dir / "logs" / ("trainer.log" if rank == 0 else
                                                 f"trainer-rank{rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    # Megatron logs every parameter of every bucket at INFO; keep its warnings only.
    for name in ("megatron.core", "megatron.bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return run_dir


class RolloutRecorder:
    """Appends each step's samples to ``<run_dir>/rollouts.jsonl`` (driver rank only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "rollouts.jsonl"
        self.enabled = enabled

    def record(self, step: int, samples: Sequence[Sample]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            for s in samples:
                fh.write(json.dumps({"step": step, "group_id": s.group_id, "prompt_ids": s.prompt_ids,
                                     "response_ids": s.response_ids, "rollout_logp": s.rollout_logp,
                                     "text": s.text, "answer": s.answer, "reward": s.reward,
                                     "advantage": s.advantage, "finish_reason": s.finish_reason,
                                     "weight_version": s.weight_version, "in_loss": s.in_loss,
                                     "meta": s.meta}) + "\n")


class Progress:
    """The step bar (driver rank, on a terminal or with ``DRPO_PROGRESS=1``) and the step line
    in the log."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar: Any = None

    def steps(self, it: Iterable[int]) -> Iterable[int]:
        self._bar = tqdm(it, desc="DRPO steps", unit="step", dynamic_ncols=True,
                         disable=not self.enabled or (not sys.stderr.isatty()
                                                      and os.environ.get("DRPO_PROGRESS") != "1"))
        return self._bar

    def show(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        msg = (f"step {step}: reward {metrics.get('rollout/reward_mean', float('nan')):.3f} "
               f"loss {metrics.get('loss/policy_loss', float('nan')):+.4f} "
               f"|logp-mu| {metrics.get('mismatch/logprob_abs_diff', float('nan')):.2e} "
               f"{metrics.get('perf/step_time_s', 0):.1f}s")
        if "eval/accuracy" in metrics:
            msg += f" eval {metrics['eval/accuracy']:.3f}"
        log.info(msg)
        if self._bar is not None:
            self._bar.set_postfix(reward=f"{metrics.get('rollout/reward_mean', 0):.3f}")
