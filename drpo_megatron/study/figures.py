"""PNG figures of a study for the docs (matplotlib, Agg backend: no display needed).

``write_figures(results, DIR/figures)`` writes

* ``<condition>.png``: reward, held-out accuracy and mismatch (``mismatch/logprob_abs_diff``,
  log axis) over steps, one colour per method, line = mean over seeds, band = min–max;
* ``final_reward.png``: final reward (mean ± std over seeds) per condition and method;
* ``mismatch.png``: mean ``mismatch/logprob_abs_diff`` per condition and method (log axis): how
  much each condition raises the training–inference mismatch.

matplotlib is imported inside :func:`write_figures` (a heavy optional dependency that nothing
else of the study needs).
"""

from __future__ import annotations

import math
from pathlib import Path

from drpo_megatron.dashboard.svg import PALETTE
from drpo_megatron.study.aggregate import EVAL, MISMATCH, REWARD
from drpo_megatron.study.results import StudyResults

__all__ = ["write_figures", "FIGURE_PANELS"]

#: Panels of the per-condition figure: (metric, y label, log y).
FIGURE_PANELS = ((REWARD, "training reward", False), (EVAL, "held-out accuracy", False),
                 (MISMATCH, "mean |log π − log µ|", True))
DPI = 110


def _bars(ax, res: StudyResults, field: str, log: bool) -> bool:
    conds, meths = res.conditions, res.methods
    width = 0.8 / max(len(meths), 1)
    drew = False
    for i, meth in enumerate(meths):
        ts = [getattr(res.cells[(c, meth)], field) for c in conds]
        xs = [j + (i - (len(meths) - 1) / 2) * width for j in range(len(conds))]
        ys = [t[0] if t[2] else math.nan for t in ts]
        err = [t[1] if t[2] else 0.0 for t in ts]
        if all(math.isnan(y) for y in ys):
            continue
        drew = True
        ax.bar(xs, ys, width * 0.95, yerr=err, capsize=2, color=PALETTE[i % len(PALETTE)],
               label=meth, log=log)
    ax.set_xticks(range(len(conds)), conds)
    return drew


def write_figures(res: StudyResults, out_dir: str | Path) -> list[Path]:
    """Write the PNGs (module docstring) into ``out_dir``; returns their paths (conditions
    without any data yet get no figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for cond in res.conditions:
        fig, axes = plt.subplots(1, len(FIGURE_PANELS), figsize=(5 * len(FIGURE_PANELS), 3.6))
        drew = False
        for ax, (key, label, log) in zip(axes, FIGURE_PANELS):
            for i, meth in enumerate(res.methods):
                c = res.curves[(cond, meth, key)]
                if not c.steps:
                    continue
                drew = True
                color = PALETTE[i % len(PALETTE)]
                ax.plot(c.steps, c.mean, color=color, lw=1.6, label=meth,
                        marker="o" if len(c.steps) < 8 else None, ms=3)
                ax.fill_between(c.steps, c.min, c.max, color=color, alpha=0.18, lw=0)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            if log and ax.has_data():
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        if drew:
            axes[0].legend(fontsize=8, ncol=2)
            n = len(res.spec.seeds)
            fig.suptitle(f"{res.spec.name}: condition {cond} (mean over {n} seed"
                         f"{'s' if n > 1 else ''}, band min–max)", fontsize=11)
            fig.tight_layout()
            p = out / f"{cond}.png"
            fig.savefig(p, dpi=DPI)
            paths.append(p)
        plt.close(fig)
    for field, name, label, log in (("final_reward", "final_reward.png",
                                     f"final reward (last {res.spec.analysis.final_window} steps)",
                                     False),
                                    ("mismatch_mean", "mismatch.png", "mean |log π − log µ|", True)):
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(res.conditions) + 2), 3.8))
        if _bars(ax, res, field, log):
            ax.set_ylabel(label)
            ax.legend(fontsize=8, ncol=2)
            ax.set_title(f"{res.spec.name}: {label}, mean ± std over seeds", fontsize=11)
            ax.grid(alpha=0.3, axis="y")
            fig.tight_layout()
            p = out / name
            fig.savefig(p, dpi=DPI)
            paths.append(p)
        plt.close(fig)
    return paths
