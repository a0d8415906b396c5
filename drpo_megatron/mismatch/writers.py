"""Metric writers: JSONL (``metrics.jsonl`` + ``histograms.jsonl``), TensorBoard, Weights & Biases.

    writers = build_writers(["jsonl", "tensorboard", "wandb"], run_dir,
                            wandb_project="drpo", wandb_mode="offline", wandb_name="bf16")
    writers.log_scalars(step, {"mismatch/logprob_abs_diff": 0.011, "loss/total": 0.3})
    writers.log_histograms(step, {"mismatch/logprob_abs_diff": per_token_tensor})
    writers.close()

Call them on one rank (rank 0) only. Options to ``build_writers`` are routed by prefix:
``jsonl_*`` -> :class:`JsonlWriter`, ``tb_*`` -> :class:`TensorBoardWriter`, ``wandb_*`` ->
:class:`WandbWriter` (prefix stripped). Options for writers that are not selected are ignored,
so one config section can carry all of them.

File formats (the dashboard reads them):

* ``RUN_DIR/metrics.jsonl``: one JSON object per ``log_scalars`` call,
  ``{"step": int, "time": unix float, "<key>": float, ...}``. Non-finite floats are written
  as ``null`` (strict JSON; ``jq`` and browsers parse it). Several lines may share a step
  (they are merged by readers); a step lower than an earlier one marks a resume.
* ``RUN_DIR/histograms.jsonl``: ``{"step", "time", "histograms": {name: summary}}`` with the
  summaries of :func:`drpo_megatron.mismatch.histograms.summarize_histogram`.
* ``RUN_DIR/tb/``: TensorBoard event files (scalars and histograms).
* ``RUN_DIR/wandb/``: the W&B run directory (offline runs: ``wandb sync`` it later).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Protocol, runtime_checkable, Sequence, Union

from .histograms import HISTOGRAM_BINS, HISTOGRAM_SCALES, summarize_histogram

__all__ = [
    "MetricWriter",
    "JsonlWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "MultiWriter",
    "WRITERS",
    "WRITER_OPTION_PREFIXES",
    "build_writers",
]

log = logging.getLogger(__name__)

#: W&B histogram bins (its maximum is 512; 64 resolves the shape and keeps the run file small).
WANDB_HISTOGRAM_BINS = 64
#: wandb 0.31's ``finish()`` can return before the offline run file is written (seen: the file
#: still holds only its 7-byte header for ~50 ms); ``close()`` waits up to this long for it.
WANDB_FLUSH_TIMEOUT_S = 30.0
_WANDB_HEADER_BYTES = 7
#: TensorBoard flush interval: live dashboards should see a step within seconds, not minutes.
TB_FLUSH_SECS = 10


@runtime_checkable
class MetricWriter(Protocol):
    """What the trainer calls. ``metrics`` values are floats (python / 0-d tensors / numpy);
    ``tensors`` values are tensors of any shape (flattened; non-finite entries dropped)."""

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_histograms(self, step: int, tensors: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _to_float(v: Any) -> Optional[float]:
    """Python float of a number / 0-d tensor / numpy scalar; None if not numeric."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Number):
        return float(v)
    if hasattr(v, "item") and getattr(v, "numel", lambda: getattr(v, "size", 1))() == 1:
        try:
            return float(v.item())
        except (TypeError, ValueError):
            return None
    return None


def _clean_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        f = _to_float(v)
        if f is None:
            log.debug("metric %r is not a number (%r); skipped", k, type(v))
            continue
        out[str(k)] = f
    return out


def _to_numpy(t: Any):
    import numpy as np

    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    a = np.asarray(t, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


class _Base:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlWriter(_Base):
    """Appends scalars to ``run_dir/metrics.jsonl`` and histogram summaries to
    ``run_dir/histograms.jsonl`` (append mode: a resumed run continues the same files)."""

    def __init__(self, run_dir: Union[str, os.PathLike], *, filename: str = "metrics.jsonl",
                 histogram_filename: str = "histograms.jsonl",
                 histogram_bins: int = HISTOGRAM_BINS):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        self.hist_path = self.run_dir / histogram_filename
        self.histogram_bins = histogram_bins
        self._f = None
        self._hf = None

    @staticmethod
    def _json_value(v: float):
        return v if math.isfinite(v) else None

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        for k, v in _clean_scalars(metrics).items():
            if k in ("step",):
                continue
            row[k] = self._json_value(v)
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(row, allow_nan=False) + "\n")
        self._f.flush()

    def log_histograms(self, step: int, tensors: Mapping[str, Any]) -> None:
        summaries = {str(k): summarize_histogram(v, self.histogram_bins, HISTOGRAM_SCALES.get(str(k)))
                     for k, v in tensors.items()}
        row = {"step": int(step), "time": time.time(), "histograms": summaries}
        if self._hf is None:
            self._hf = open(self.hist_path, "a", encoding="utf-8")
        self._hf.write(json.dumps(row, allow_nan=False) + "\n")
        self._hf.flush()

    def close(self) -> None:
        for f in (self._f, self._hf):
            if f is not None:
                f.close()
        self._f = self._hf = None


class TensorBoardWriter(_Base):
    """TensorBoard event files under ``run_dir/tb`` (torch.utils.tensorboard.SummaryWriter)."""

    def __init__(self, run_dir: Union[str, os.PathLike], *, flush_secs: int = TB_FLUSH_SECS,
                 subdir: str = "tb"):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / subdir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in _clean_scalars(metrics).items():
            self._w.add_scalar(k, v, global_step=int(step))
        self._w.flush()

    def log_histograms(self, step: int, tensors: Mapping[str, Any]) -> None:
        for k, v in tensors.items():
            a = _to_numpy(v)
            if a.size:
                self._w.add_histogram(str(k), a, global_step=int(step))
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class WandbWriter(_Base):
    """A Weights & Biases run in ``run_dir/wandb``; ``mode="offline"`` needs no network
    (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later).

    W&B drops steps lower than its current step: after a resume to an earlier checkpoint the
    replayed steps appear only in metrics.jsonl / TensorBoard (start a new W&B run, or use
    ``resume_from``, if you need them there).
    """

    def __init__(self, run_dir: Union[str, os.PathLike], project: str = "drpo-megatron",
                 mode: str = "offline", *, name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None,
                 histogram_bins: int = WANDB_HISTOGRAM_BINS, **init_kwargs: Any):
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the 'wandb' writer needs the wandb package "
                              "(pip install --no-deps wandb==0.31.0, see requirements/)") from e
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.histogram_bins = histogram_bins
        settings = init_kwargs.pop("settings", None) or wandb.Settings(
            silent=True, console="off", save_code=False, disable_git=True)
        self._run = wandb.init(project=project, dir=str(self.run_dir), mode=mode, name=name,
                               config=dict(config) if config else None, settings=settings,
                               reinit="create_new", **init_kwargs)
        # Only offline / online runs write a local run file ("disabled" runs write nothing).
        run_mode = getattr(self._run.settings, "mode", mode)
        self.sync_file = (getattr(self._run.settings, "sync_file", None)
                          if run_mode in ("offline", "online", "run") else None)

    @property
    def run(self):
        return self._run

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(_clean_scalars(metrics), step=int(step))

    def log_histograms(self, step: int, tensors: Mapping[str, Any]) -> None:
        data = {}
        for k, v in tensors.items():
            a = _to_numpy(v)
            if a.size:
                data[str(k)] = self._wandb.Histogram(a, num_bins=self.histogram_bins)
        if data:
            self._run.log(data, step=int(step))

    def close(self) -> None:
        """Finish the run and wait until its local run file is written (so that ``wandb sync``
        or a reader right after ``close()`` sees every step)."""
        if self._run is None:
            return
        self._run.finish()
        self._run = None
        if self.sync_file:
            _wait_file_settled(Path(self.sync_file), WANDB_FLUSH_TIMEOUT_S)


def _wait_file_settled(path: Path, timeout_s: float, poll_s: float = 0.05) -> bool:
    """True once ``path`` holds more than the W&B header and its size is stable over a poll."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while time.monotonic() < deadline:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size > _WANDB_HEADER_BYTES and size == last:
            return True
        last = size
        time.sleep(poll_s)
    log.warning("W&B run file %s not written %.0f s after finish()", path, timeout_s)
    return False


class MultiWriter(_Base):
    """Fans out to several writers. A writer that raises is reported (with its traceback,
    once) and skipped for that call; the others keep logging, so a broken W&B install does
    not stop the JSONL record of a long run. ``strict=True`` re-raises instead."""

    def __init__(self, writers: Sequence[MetricWriter], *, strict: bool = False):
        self.writers = list(writers)
        self.strict = strict
        self.failures: dict[str, int] = {}

    def _call(self, method: str, *args) -> None:
        for w in self.writers:
            try:
                getattr(w, method)(*args)
            except Exception:
                if self.strict:
                    raise
                name = type(w).__name__
                self.failures[name] = self.failures.get(name, 0) + 1
                if self.failures[name] == 1:
                    log.exception("metric writer %s failed in %s (further failures counted "
                                  "silently)", name, method)

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._call("log_scalars", step, metrics)

    def log_histograms(self, step: int, tensors: Mapping[str, Any]) -> None:
        if not tensors:
            return
        # Move to CPU once for all writers.
        cpu = {k: (v.detach().float().cpu() if hasattr(v, "detach") else v)
               for k, v in tensors.items()}
        self._call("log_histograms", step, cpu)

    def close(self) -> None:
        self._call("close")
        if self.failures:
            log.warning("metric writer failures: %s", self.failures)


#: name -> writer class. ``build_writers`` accepts these names (and the aliases below).
WRITERS: dict[str, type] = {
    "jsonl": JsonlWriter,
    "tensorboard": TensorBoardWriter,
    "wandb": WandbWriter,
}
_ALIASES = {"tb": "tensorboard", "json": "jsonl"}
#: logging.writers entries: a writer name or an alias
WriterName = Literal["jsonl", "tensorboard", "wandb", "tb", "json"]
#: Option prefix per writer for ``build_writers(**opts)``.
WRITER_OPTION_PREFIXES = {"jsonl": "jsonl_", "tensorboard": "tb_", "wandb": "wandb_"}


def build_writers(names: Union[str, Sequence[str]], run_dir: Union[str, os.PathLike],
                  **opts: Any) -> MultiWriter:
    """Writers named in ``names`` (a list, or a comma-separated string) writing to ``run_dir``.

    Unknown names raise ``ValueError`` listing the valid ones. ``opts`` are routed by prefix
    (see the module docstring); an option with no known prefix raises ``TypeError``. Options:
    ``strict`` (MultiWriter), ``wandb_project`` (default "drpo-megatron"), ``wandb_mode``
    (default "offline"), ``wandb_name``, ``wandb_config``, other ``wandb_*`` go to
    ``wandb.init``; ``tb_flush_secs``; ``jsonl_histogram_bins``.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted: list[str] = []
    for raw in names:
        n = str(raw).strip().lower()
        if not n:
            continue
        n = _ALIASES.get(n, n)
        if n not in WRITERS:
            raise ValueError(f"unknown metric writer {raw!r}; valid writers: "
                             f"{', '.join(sorted(WRITERS))} (alias: tb)")
        if n not in wanted:
            wanted.append(n)
    strict = bool(opts.pop("strict", False))
    per: dict[str, dict] = {n: {} for n in WRITERS}
    for k, v in opts.items():
        for n, p in WRITER_OPTION_PREFIXES.items():
            if k.startswith(p):
                per[n][k[len(p):]] = v
                break
        else:
            raise TypeError(f"build_writers: option {k!r} has no writer prefix "
                            f"({', '.join(WRITER_OPTION_PREFIXES.values())})")
    writers = []
    for n in wanted:
        kw = per[n]
        if n == "wandb":
            project = kw.pop("project", "drpo-megatron")
            mode = kw.pop("mode", "offline")
            writers.append(WandbWriter(run_dir, project, mode, **kw))
        else:
            writers.append(WRITERS[n](run_dir, **kw))
    return MultiWriter(writers, strict=strict)
