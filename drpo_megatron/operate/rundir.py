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

from drpo_megatron.errors import InputError
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
                                     "meta": s.meta, **_routes_field(s),
                                     **({} if s.token_versions is None
                                        else {"token_versions": s.token_versions})}) + "\n")


def _routes_field(s: Sample) -> dict[str, Any]:
    """``routed_experts`` ({shape [T, L, K], dtype, b64}) when the sample carries the engine's
    routes (rollout.routing_replay record / replay)."""
    return {} if s.routed_experts is None else {"routed_experts": s.routed_experts.to_json()}


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


# ---------------------------------------------------------------------------- before a resume
#: Config fields a resumed run may change (dotted prefixes): how long and how often things
#: happen, logging, server launch details, the router, the check after a push, and the TP/PP
#: layout (checkpoints are resharded on load: training/checkpoint.py).  Everything else (the
#: model, the task, the loss and its parameters, the optimizer, sampling, the seed) changes what
#: the run is, so a resume with another value is refused before anything is overwritten.
RESUME_SAFE_CHANGES = (
    "name", "output_dir", "train.max_steps", "train.eval_every", "train.eval_samples_per_prompt",
    "train.save_every", "train.resume", "train.max_nonfinite_updates", "logging.",
    "rollout.server.", "rollout.verify_sync", "rollout.max_attempts", "rollout.num_servers",
    "rollout.router", "rollout.weight_transport", "rollout.weight_bucket_mb",
    "rollout.mode", "rollout.max_staleness", "rollout.stale_policy", "rollout.partial_rollouts",
    "parallel.tp", "parallel.pp", "parallel.etp", "parallel.sequence_parallel", "parallel.num_nodes",
    "parallel.gpus_per_node", "parallel.micro_batch_size", "parallel.recompute", "parallel.device",
    "parallel.rollout_nodes", "parallel.rollout_tp", "parallel.gpu_memory_gb",
)  # rollout.mode & co: the batches a checkpoint holds are checked against the new bound
#    not parallel.ep / use_distributed_optimizer: Megatron's optimizer state does not move
#    between EP = 1 and EP > 1, nor between the plain and the distributed optimizer


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and ``loss.params`` values stay whole)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "loss.params":
            out.update(flatten(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def unsafe_resume_changes(old: dict[str, Any], new: dict[str, Any],
                          defaults: dict[str, Any] | None = None) -> list[str]:
    """The fields whose value differs between the checkpoint's config and this run's, outside
    :data:`RESUME_SAFE_CHANGES`, as ``field: old -> new`` lines.  A field the checkpoint's config
    does not have (saved before the field existed) counts as its value in ``defaults`` (the
    current defaults, flattened like the configs), so adding a field does not break resuming."""
    a, b = flatten(old), flatten(new)
    for key, value in (defaults or {}).items():
        a.setdefault(key, value)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        if any(key == s or (s.endswith(".") and key.startswith(s)) or key.startswith(s + ".")
               for s in RESUME_SAFE_CHANGES):
            continue
        lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def check_writable(run_dir: Path) -> None:
    """The run directory can be created and written (before anything expensive starts)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output_dir={str(run_dir)!r} cannot be written ({e.strerror}); choose a "
                         "directory you can write to with --output-dir") from None


def rollback_jsonl(path: Path, step: int) -> int:
    """Drop the records of steps after ``step`` from a run's jsonl file (``metrics.jsonl``,
    ``rollouts.jsonl``): after a resume from the checkpoint of ``step`` the steps after it run
    again and are recorded again, each once.  Atomic (written aside, then renamed); returns the
    number of records dropped.  A torn last line (a kill mid-write) is dropped too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path) as fh:
        for line in fh:
            try:
                rec_step = int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError):
                dropped += 1
                continue
            if rec_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
