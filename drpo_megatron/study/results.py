"""Read a study directory: its resolved spec, every run's metrics, the aggregates.

``load_study(DIR)`` is what ``drpo dashboard DIR`` and the study's own report use.  Runs are
read with the dashboard's tolerant reader (:func:`drpo_megatron.dashboard.data.load_run`:
torn lines, NaN, resumed timelines), so a study can be looked at while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import yaml

from drpo_megatron.dashboard.data import CONFIG_FILE, METRICS_FILE, Run, load_run
from drpo_megatron.study.aggregate import (EVAL, GRAD_NORM, MISMATCH, REWARD, TRUNCATED,
                                           CellSummary, Curve, aggregate_curve, summarize_cell,
                                           summarize_seed)
from drpo_megatron.study.runner import RunState, run_state
from drpo_megatron.study.spec import (RESOLVED_SPEC_FILE, RUNS_DIR, PlannedRun, StudySpec, plan_runs,
                                      spec_from_dict)

__all__ = ["CURVE_KEYS", "StudyResults", "is_study_dir", "load_study", "study_signature"]

#: Curves shown per condition: (metric, title).
CURVE_KEYS = (
    (REWARD, "training reward (rollout/reward_mean)"),
    (EVAL, "held-out accuracy (eval/accuracy)"),
    (MISMATCH, "mean |log π − log µ| (mismatch/logprob_abs_diff)"),
    ("mismatch/token_mult_prob_error", "token_mult_prob_error = mean exp|log π − log µ|"),
    ("mismatch/kl_k3_rollout_train", "KL(µ‖π), k3 (mismatch/kl_k3_rollout_train)"),
    (TRUNCATED, "responses cut at max_new_tokens (rollout/truncated_frac)"),
    (GRAD_NORM, "gradient norm (loss/grad_norm)"),
)


@dataclass
class StudyResults:
    dir: Path
    spec: StudySpec
    runs: list[PlannedRun]
    loaded: dict[str, Run] = field(default_factory=dict)        # run id -> its data
    states: dict[str, RunState] = field(default_factory=dict)   # run id -> finished / ...
    cells: dict[tuple[str, str], CellSummary] = field(default_factory=dict)
    curves: dict[tuple[str, str, str], Curve] = field(default_factory=dict)  # (cond, meth, key)

    @property
    def conditions(self) -> list[str]:
        return [c.name for c in self.spec.conditions]

    @property
    def methods(self) -> list[str]:
        return [m.name for m in self.spec.methods]

    def cell_runs(self, condition: str, method: str) -> list[PlannedRun]:
        return [r for r in self.runs if r.condition == condition and r.method == method]


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / RESOLVED_SPEC_FILE).is_file()


def load_study(path: str | Path, *, states: bool = True) -> StudyResults:
    """Spec, runs, per-run data, cell summaries and curves of the study in ``path``.
    ``states=False`` skips the finished / interrupted check (it reads checkpoints)."""
    d = Path(path).expanduser().resolve()
    spec = spec_from_dict(yaml.safe_load((d / RESOLVED_SPEC_FILE).read_text()),
                          str(d / RESOLVED_SPEC_FILE))
    res = StudyResults(d, spec, plan_runs(spec, d, validate=False))
    for r in res.runs:
        if r.run_dir.is_dir():
            res.loaded[r.run_id] = load_run(r.run_dir)
            res.loaded[r.run_id].label = r.run_id
        if states:
            res.states[r.run_id] = run_state(r.run_dir, r.max_steps)
    for cond in res.conditions:
        for meth in res.methods:
            data = [(r.seed, res.loaded[r.run_id]) for r in res.cell_runs(cond, meth)
                    if r.run_id in res.loaded and res.loaded[r.run_id].steps]
            res.cells[(cond, meth)] = summarize_cell(
                cond, meth, [summarize_seed(seed, run.scalars, spec.analysis) for seed, run in data])
            for key, _ in CURVE_KEYS:
                res.curves[(cond, meth, key)] = aggregate_curve(
                    [run.scalars.get(key, {}) for _, run in data])
    return res


def study_signature(path: str | Path) -> tuple:
    """Changes whenever the spec or a run's config / metrics change (``--serve`` reload)."""
    d = Path(path)
    files = [d / RESOLVED_SPEC_FILE]
    runs_root = d / RUNS_DIR
    if runs_root.is_dir():
        for cfg in sorted(runs_root.glob(f"*/*/*/{CONFIG_FILE}")):
            files += [cfg, cfg.parent / METRICS_FILE]
    sig = []
    for f in files:
        try:
            st = f.stat()
            sig.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((str(f), None, None))
    return tuple(sig)

