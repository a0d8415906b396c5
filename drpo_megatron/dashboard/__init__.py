"""``drpo dashboard RUN_DIR [RUN_DIR ...] [-o report.html] [--serve]``: one self-contained HTML
mismatch report from run directories (see :mod:`drpo_megatron.dashboard.cli`)."""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main", "build_html"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code."""
    from .cli import main as _main

    return _main(argv)


def build_html(run_dirs: Sequence[str], **kwargs) -> str:
    """The report for ``run_dirs`` as an HTML string (kwargs: title, window)."""
    from .cli import render

    return render(list(run_dirs), **kwargs)
