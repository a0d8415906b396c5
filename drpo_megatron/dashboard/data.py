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


def _is_fp8(v: Any) -> Optional[bool]:
    """True / False when the value says something about FP8, None when it says nothing."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        s = v.lower()
        if "fp8" in s or "e4m3" in s or "float8" in s:
            return True
        if s in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32", "none", "false", "off", ""):
            return False
        return None
    if isinstance(v, dict):
        for k in ("enabled", "enable", "fp8"):
            if k in v:
                return _is_fp8(v[k])
        return bool(v)
    return None


def describe_config(cfg: dict) -> dict[str, str]:
    """Legend fields from a resolved config: name, model, loss (with its delta when set in
    ``loss.params.delta`` or ``loss.delta``), precision ('' if unknown).

    precision: "FP8 end-to-end" (FP8 training and FP8 rollout), "FP8 rollout", "FP8 training",
    or the rollout precision upper-cased (e.g. "BF16")."""
    cfg = cfg if isinstance(cfg, dict) else {}
    name = _get(cfg, "name")
    model = _get(cfg, "model.name") or _get(cfg, "model.hf_path") or _get(cfg, "model.path")
    if not model and isinstance(_get(cfg, "model.tiny"), dict):
        model = "built-in tiny model"
    if isinstance(model, str) and model.count("/") > 1:
        model = "/".join(model.rstrip("/").split("/")[-2:])
    loss = _get(cfg, "loss.name") or (_get(cfg, "loss") if isinstance(_get(cfg, "loss"), str) else None)
    rp = _get(cfg, "rollout.precision")
    r8 = _is_fp8(_get(cfg, "rollout.fp8"))
    if r8 is None:
        r8 = _is_fp8(rp)
    t8 = None
    for k in ("training.fp8", "train.fp8", "trainer.fp8", "model.fp8", "training.precision",
              "train.precision", "precision"):
        t8 = _is_fp8(_get(cfg, k))
        if t8 is not None:
            break
    if r8 and t8:
        prec = "FP8 end-to-end"
    elif r8:
        prec = "FP8 rollout"
    elif t8:
        prec = "FP8 training"
    elif isinstance(rp, str) and rp:
        prec = rp.upper()
    elif isinstance(_get(cfg, "model.dtype"), str) and _get(cfg, "model.dtype"):
        prec = str(_get(cfg, "model.dtype")).upper()  # no FP8 anywhere: the model's dtype
    elif r8 is False or t8 is False:
        prec = "BF16"
    else:
        prec = ""
    delta = _get(cfg, "loss.params.delta")
    if delta is None:
        delta = _get(cfg, "loss.delta")
    if loss and isinstance(delta, (int, float)) and not isinstance(delta, bool):
        loss = f"{loss} (δ={delta:g})"
    return {"name": str(name) if name is not None else "", "model": str(model or ""),
            "loss": str(loss or ""), "precision": prec}


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
