"""The learning-rate check table of docs/paper-claims.md: each method of a learning-rate sweep
study next to a reference study's condition at its own learning rate, over the same seeds.

    .venv/bin/python tools/lr_check_table.py runs/studies/lr_sweep_bf16 \\
        --reference runs/studies/paper_claims --reference-condition bf16 --reference-lr 5e-4

Cells: final reward (the study's "final reward": mean over the last analysis.final_window steps)
mean ± std over the seeds, final eval accuracy, collapses (docs/study.md).  "best lr": fewest
collapses, then highest mean final reward.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse

from drpo_megatron.study.aggregate import SeedSummary, mean_std
from drpo_megatron.study.results import load_study


def _cell(seeds: list[SeedSummary]) -> str:
    if not seeds:
        return "–"
    f, e = mean_std([s.final_reward for s in seeds]), mean_std([s.final_eval for s in seeds])
    collapsed = sum(s.collapse is not None for s in seeds)
    return f"{f[0]:.3f} ± {f[1]:.3f} (eval {e[0]:.3f}; {collapsed}/{len(seeds)} coll.)"


def _rank(seeds: list[SeedSummary]) -> tuple[float, float]:
    if not seeds:
        return (float("-inf"), float("-inf"))
    return (-sum(s.collapse is not None for s in seeds), sum(s.final_reward for s in seeds) / len(seeds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="study directory whose conditions are learning rates (lr<value>)")
    ap.add_argument("--reference", required=True, help="study directory to take one more column from")
    ap.add_argument("--reference-condition", required=True)
    ap.add_argument("--reference-lr", required=True, help="the learning rate of that condition (label)")
    args = ap.parse_args()
    sweep, ref = load_study(args.sweep), load_study(args.reference)
    seeds = set(sweep.spec.seeds)
    columns = [(c.name.removeprefix("lr"), sweep, c.name) for c in sweep.spec.conditions]
    columns.append((args.reference_lr, ref, args.reference_condition))
    head = " | ".join(f"lr {lr}" for lr, _, _ in columns)
    print(f"| method | {head} | best lr (fewest collapses, then final reward) |")
    print("|---" * (len(columns) + 2) + "|")
    for m in (m.name for m in sweep.spec.methods):
        cells = {}
        for lr, res, cond in columns:
            cell = res.cells.get((cond, m))
            cells[lr] = [s for s in cell.seeds if s.seed in seeds] if cell else []
        best = max(cells, key=lambda lr: _rank(cells[lr]))
        print(f"| {m} | " + " | ".join(_cell(cells[lr]) for lr, _, _ in columns) + f" | {best} |")


if __name__ == "__main__":
    main()
