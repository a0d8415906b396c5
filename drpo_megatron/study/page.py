"""Registers the study page with ``drpo dashboard``: a directory holding a resolved study spec
(``study.yaml``) is shown as a study (per condition, each method's mean curve with its spread over
seeds, and the summary table); its summary tables as Markdown (``summary.md``) and PNG figures
are written next to it."""

from __future__ import annotations

from pathlib import Path

from drpo_megatron.dashboard.cli import DirectoryPage, register_directory_page
from drpo_megatron.study.figures import write_figures
from drpo_megatron.study.report import build_study_report, summary_markdown
from drpo_megatron.study.results import load_study, study_signature
from drpo_megatron.study.spec import RESOLVED_SPEC_FILE


def _after_write(d: Path, figures: bool) -> list[str]:
    res = load_study(d)
    tmp = d / "summary.md.tmp"  # the summary tables as Markdown, written atomically
    tmp.write_text(summary_markdown(res), encoding="utf-8")
    tmp.replace(d / "summary.md")
    done = [f"wrote {d / 'summary.md'}"]
    if figures:
        pngs = write_figures(res, d / "figures")
        done.append(f"wrote {len(pngs)} figure(s) in {d / 'figures'}")
    return done


STUDY_PAGE = DirectoryPage(
    name="study",
    detect=lambda d: (d / RESOLVED_SPEC_FILE).is_file(),
    render=lambda d, **kw: build_study_report(load_study(d), **kw),
    signature=study_signature,
    after_write=_after_write,
)
register_directory_page(STUDY_PAGE)
