"""``drpo study SPEC.yaml --out DIR [--parallel N] [--dry-run] [--no-report]``.

Validates the spec and every run config, writes the resolved spec to ``DIR/study.yaml``, runs
what is not finished (:mod:`drpo_megatron.study.runner`), then writes the study's dashboard
page ``DIR/report.html`` and PNG figures ``DIR/figures/*.png`` (as ``drpo dashboard DIR`` does).
Exit codes: 0 all runs finished; 1 a run failed; 2 bad spec; 75 stopped by a signal (run the
same command again to resume).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from drpo_megatron.study.runner import EXIT_PREEMPTED, check_existing, run_state, run_study
from drpo_megatron.study.spec import (RESOLVED_SPEC_FILE, StudySpecError, load_spec, plan_runs,
                                      resolved_spec)

__all__ = ["main", "build_parser", "write_report"]

#: The repository root (for the commit recorded in DIR/study.yaml).
_REPO = Path(__file__).resolve().parents[2]


def _commit() -> str:
    """``git describe``-like provenance of this checkout: the commit, "+dirty" when the work
    tree has changes; "" outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return (sha + ("+dirty" if dirty else "")) if sha else ""


def write_report(out_dir: str | Path, figures: bool = True) -> tuple[Path, list[Path]]:
    """``DIR/report.html`` (the study page), ``DIR/summary.md`` (its summary tables in Markdown)
    and, with ``figures``, ``DIR/figures/*.png``."""
    from drpo_megatron.dashboard.cli import _write
    from drpo_megatron.study.report import build_study_report, summary_markdown
    from drpo_megatron.study.results import load_study

    res = load_study(out_dir)
    page = Path(out_dir) / "report.html"
    _write(page, build_study_report(res))
    _write(Path(out_dir) / "summary.md", summary_markdown(res))
    pngs = []
    if figures:
        from drpo_megatron.study.figures import write_figures

        pngs = write_figures(res, Path(out_dir) / "figures")
    return page, pngs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drpo study",
        description="Run a study: every condition x method x seed of SPEC is one drpo train run "
                    "in DIR/runs/<condition>/<method>/seed<seed>; re-running skips finished runs "
                    "and resumes interrupted ones (docs/study.md).")
    p.add_argument("spec", metavar="SPEC.yaml",
                   help="study spec, e.g. model_configs/studies/paper_claims.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at a time (default 1: one after another)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, write DIR/study.yaml and list the runs with their state; "
                        "train nothing")
    p.add_argument("--no-report", action="store_true",
                   help="do not write DIR/report.html and DIR/figures/ at the end")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.parallel < 1:
        print(f"drpo study: --parallel {args.parallel}: must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    try:
        spec, spec_dir = load_spec(args.spec)
        runs = plan_runs(spec, out, spec_dir)
        check_existing(runs)
        resolved = resolved_spec(spec, spec_dir, spec_file=str(Path(args.spec).resolve()),
                                 command="drpo study " + shlex.join(
                                     list(sys.argv[2:] if argv is None else argv)),
                                 commit=_commit())
    except StudySpecError as e:
        print(f"drpo study: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESOLVED_SPEC_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    os.replace(tmp, out / RESOLVED_SPEC_FILE)
    if args.dry_run:
        for r in runs:
            st = run_state(r.run_dir, r.max_steps)
            last = "" if st.last_step is None else f" (last step {st.last_step}/{r.max_steps})"
            print(f"{r.run_id:40s} {st.state}{last}")
        print(f"{len(runs)} runs; resolved spec: {out / RESOLVED_SPEC_FILE}")
        return 0
    result = run_study(runs, out, parallel=args.parallel)
    print(f"study {out}: {len(result.skipped) + len(result.completed)}/{result.total} runs "
          f"finished ({len(result.completed)} now, {len(result.skipped)} before)"
          + (f"; failed: {', '.join(f'{r} (exit {c})' for r, c in result.failed)}"
             if result.failed else "")
          + (f"; stopped (resume with the same command): {len(result.stopped)}"
             if result.stopped else ""))
    if not args.no_report:
        page, pngs = write_report(out)
        print(f"wrote {page} and {len(pngs)} figure(s) in {out / 'figures'}")
    if result.failed:
        return 1
    return EXIT_PREEMPTED if result.stopped else 0
