"""``drpo study SPEC.yaml --out DIR``: a grid of ordinary ``drpo train`` runs (methods x
conditions x seeds), resumable, aggregated over seeds (docs/study.md).

* :mod:`.spec`: the spec model and how each run's config is merged;
* :mod:`.runner`: finished / interrupted / new from each run's files, one ``drpo train``
  subprocess per run, progress and ETA;
* :mod:`.aggregate`: mean / std / spread curves, per-seed summaries, collapse detection;
* :mod:`.results`, :mod:`.report`, :mod:`.figures`: reading a study directory, its dashboard
  page (``drpo dashboard DIR``) and PNG figures.
"""

from __future__ import annotations

from typing import Optional, Sequence

from . import page  # noqa: F401 - registers the study page with `drpo dashboard`

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import main as _main

    return _main(argv)
