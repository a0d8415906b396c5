"""Read run directories (config.yaml, metrics.jsonl, histograms.jsonl) tolerantly.

A run may be in progress (last line half written), may have been resumed from an earlier
checkpoint (steps go backwards: the later timeline replaces the earlier one from that step on
and the resume is recorded), may lack keys in some steps, and may contain NaN / Infinity /
null values (read as NaN). Nothing here raises on bad content; problems are counted in
``Run.problems``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["Run", "load_run", "load_runs", "run_signature", "describe_config"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTOGRAMS_FILE = "histograms.jsonl"


@dataclass
class Run:
    path: Path
    label: str
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # name, model, loss, precision (strings)
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    times: dict[int, float] = field(default_factory=dict)
    histograms: dict[str, dict[int, dict]] = field(default_factory=dict)
    resumes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    idx: int = 0
    color: str = "#4e79a7"

    @property
    def steps(self) -> list[int]:
        s: set[int] = set(self.times)
        for v in self.scalars.values():
            s.update(v)
        return sorted(s)

    def has(self, key: str) -> bool:
        return key in self.scalars and any(math.isfinite(v) for v in self.scalars[key].values())

    def series(self, key: str) -> tuple[list[int], list[float]]:
        d = self.scalars.get(key, {})
        xs = sorted(d)
        return xs, [d[x] for x in xs]

    def window_values(self, key: str, window: int = 0) -> list[float]:
        """Finite values of ``key`` over the last ``window`` logged steps (0 = all)."""
        xs, ys = self.series(key)
        if window > 0:
            ys = ys[-window:]
        return [y for y in ys if math.isfinite(y)]

    def latest_histogram(self, name: str) -> Optional[tuple[int, dict]]:
        h = self.histograms.get(name)
        if not h:
            return None
        for step in sorted(h, reverse=True):
            if h[step].get("counts"):
                return step, h[step]
        return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _as_float(v: Any) -> Optional[float]:
    if v is None:
        return math.nan
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v.strip().lower().replace("infinity", "inf"))
    return None


def _read_lines(path: Path, problems: list[str]):
    """Yield parsed JSON objects; a torn last line (no trailing newline) is skipped silently."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        problems.append(f"{path.name}: {e}")
        return
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn = not text.endswith("\n")
    bad = 0
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if not (torn and i == len(lines) - 1):
                bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
            continue
        yield obj
    if bad:
        problems.append(f"{path.name}: {bad} unreadable line(s) skipped")


def _step_of(obj: dict) -> Optional[int]:
    s = obj.get("step")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        return None
    return int(s)


def _load_metrics(run: Run, path: Path) -> None:
    max_step: Optional[int] = None
    no_step = 0
    for obj in _read_lines(path, run.problems):
        step = _step_of(obj)
        if step is None:
            no_step += 1
            continue
        if max_step is not None and step < max_step:
            # Resumed from an earlier checkpoint: the new timeline replaces steps >= step.
            run.resumes.append(step)
            for d in run.scalars.values():
                for s in [s for s in d if s >= step]:
                    del d[s]
            for s in [s for s in run.times if s >= step]:
                del run.times[s]
            max_step = step
        max_step = step if max_step is None else max(max_step, step)
        t = _as_float(obj.get("time"))
        if t is not None and math.isfinite(t):
            run.times[step] = t
        for k, v in _flatten(obj).items():
            if k in ("step", "time"):
                continue
            f = _as_float(v)
            if f is None:
                continue
            run.scalars.setdefault(k, {})[step] = f
    if no_step:
        run.problems.append(f"{path.name}: {no_step} line(s) without a numeric 'step'")


def _load_histograms(run: Run, path: Path) -> None:
    max_step: Optional[int] = None
    for obj in _read_lines(path, run.problems):
        step = _step_of(obj)
        hs = obj.get("histograms")
        if step is None or not isinstance(hs, dict):
            continue
        if max_step is not None and step < max_step:
            for d in run.histograms.values():
                for s in [s for s in d if s >= step]:
                    del d[s]
        max_step = step if max_step is None else max(max_step, step)
        for name, h in hs.items():
            if isinstance(h, dict) and _valid_hist(h):
                run.histograms.setdefault(str(name), {})[step] = h


def _valid_hist(h: dict) -> bool:
    if h.get("n", 0) == 0:
        return True
    e, c = h.get("edges"), h.get("counts")
    try:
        return (isinstance(e, list) and isinstance(c, list) and len(e) == len(c) + 1 and len(c) > 0
                and all(math.isfinite(float(x)) for x in e) and all(e[i] <= e[i + 1] for i in range(len(c)))
                and all(float(x) >= 0 for x in c))
    except (TypeError, ValueError):
        return False


def _get(cfg: Any, dotted: str) -> Any:
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


#: ``rollout.precision`` values (weights/hf_export.py ROLLOUT_PRECISIONS) as legend words.
ROLLOUT_PRECISION_LABELS = {
    "bf16": "BF16",
    "fp8": "FP8 rollout",
    "fp8_emulated": "FP8 rollout (emulated)",
    "nvfp4_emulated": "NVFP4 rollout (emulated)",
    "mxfp4_emulated": "MXFP4 rollout (emulated)",
}
#: Loss parameter names shown as symbols in the legend (``loss.params``).
PARAM_SYMBOLS = {"delta": "δ", "epsilon": "ε"}


def _describe_precision(cfg: dict) -> str:
    """From ``rollout.precision`` and ``model.fp8`` (FP8 training; "" = off): the
    ``ROLLOUT_PRECISION_LABELS`` word ("BF16", "FP8 rollout", "NVFP4 rollout (emulated)", ...;
    unknown values upper-cased), "FP8 end-to-end" for FP8 training with an FP8 rollout,
    "FP8 training, <rollout word>" otherwise with FP8 training; "" when the config names
    neither."""
    rp = _get(cfg, "rollout.precision")
    train_fp8 = _get(cfg, "model.fp8")
    train_fp8 = isinstance(train_fp8, str) and bool(train_fp8)
    if not isinstance(rp, str) or not rp:
        return "FP8 training" if train_fp8 else ""
    word = ROLLOUT_PRECISION_LABELS.get(rp, rp.upper())
    if not train_fp8:
        return word
    return "FP8 end-to-end" if rp == "fp8" else f"FP8 training, {word} rollout" if rp == "bf16" \
        else f"FP8 training, {word}"


def _describe_loss(cfg: dict) -> str:
    """``loss.name`` with its ``loss.params``, e.g. "drpo (δ=12.5)",
    "ppo_clip (eps_low=0.2, eps_high=0.28)"."""
    name = _get(cfg, "loss.name")
    if not isinstance(name, str) or not name:
        return ""
    params = _get(cfg, "loss.params")
    if not isinstance(params, dict) or not params:
        return name
    parts = []
    for k, v in params.items():
        sym = PARAM_SYMBOLS.get(k, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            parts.append(f"{sym}={v}")
        else:
            parts.append(f"{sym}={v:g}")
    return f"{name} ({', '.join(parts)})"


def describe_config(cfg: dict) -> dict[str, str]:
    """Legend fields from a run's resolved ``config.yaml`` (``RunConfig.to_dict()``): ``name``;
    ``model``: the last two parts of ``model.hf_path``, or "built-in tiny model" when it is
    empty; ``loss``: ``loss.name`` with ``loss.params``; ``precision``: see
    :func:`_describe_precision`.  Missing keys give ''."""
    cfg = cfg if isinstance(cfg, dict) else {}
    name = _get(cfg, "name")
    hf = _get(cfg, "model.hf_path")
    if isinstance(hf, str) and hf:
        model = "/".join(hf.rstrip("/").split("/")[-2:]) if hf.count("/") > 1 else hf
    elif hf == "" or isinstance(_get(cfg, "model.tiny"), dict):
        model = "built-in tiny model"
    else:
        model = ""
    return {"name": str(name) if name is not None else "", "model": model,
            "loss": _describe_loss(cfg), "precision": _describe_precision(cfg)}


def _load_config(run: Run, path: Path) -> None:
    if not path.exists():
        return
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except Exception as e:  # yaml errors, missing PyYAML
        run.problems.append(f"{CONFIG_FILE}: unreadable ({type(e).__name__})")
        return
    if isinstance(cfg, dict):
        run.config = cfg
    elif cfg is not None:
        run.problems.append(f"{CONFIG_FILE}: not a mapping")


def load_run(path: os.PathLike | str) -> Run:
    p = Path(path)
    run = Run(path=p, label=p.resolve().name or str(p))
    _load_config(run, p / CONFIG_FILE)
    run.info = describe_config(run.config)
    if run.info["name"]:
        run.label = run.info["name"]
    mp = p / METRICS_FILE
    if mp.exists():
        _load_metrics(run, mp)
    else:
        run.problems.append(f"no {METRICS_FILE} yet")
    hp = p / HISTOGRAMS_FILE
    if hp.exists():
        _load_histograms(run, hp)
    return run


def load_runs(paths: list, palette: tuple[str, ...]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    seen: dict[str, int] = {}
    for i, r in enumerate(runs):
        r.idx = i
        r.color = palette[i % len(palette)]
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label} ({n + 1})"
    return runs


def run_signature(paths: list) -> tuple:
    """Changes whenever a run's files change (size / mtime): the --serve reload trigger."""
    sig = []
    for p in paths:
        for f in (CONFIG_FILE, METRICS_FILE, HISTOGRAMS_FILE):
            try:
                st = (Path(p) / f).stat()
                sig.append((str(p), f, st.st_size, st.st_mtime_ns))
            except OSError:
                sig.append((str(p), f, None, None))
    return tuple(sig)
