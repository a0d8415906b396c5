"""Command line: build the report once, or serve it live.

    drpo dashboard runs/bf16 runs/fp8 -o report.html
    drpo dashboard runs/bf16 --serve --port 8765     # http://127.0.0.1:8765/ , reloads on change
    python -m drpo_megatron.dashboard ...            # same
    drpo dashboard STUDY_DIR                         # a `drpo study` directory: the study page
                                                     # (STUDY_DIR/report.html + figures/*.png)

A run directory holds ``config.yaml``, ``metrics.jsonl`` and optionally ``histograms.jsonl``
(see :mod:`drpo_megatron.mismatch.writers`). Directories without metrics yet are shown as
empty runs (useful with ``--serve`` at the start of a job).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import sys
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from drpo_megatron.errors import InputError

from .data import load_runs, run_signature
from .report import build_report
from .svg import PALETTE

__all__ = ["main", "render", "make_server", "build_parser"]

DEFAULT_PORT = 8765
DEFAULT_TITLE = "DRPO mismatch report"
#: Seconds between the live page's checks for new data (cheap: a stat() per file).
DEFAULT_REFRESH_S = 5.0


@dataclass
class DirectoryPage:
    """A page for a directory that is not one run (a plug-in point: ``drpo_megatron.study``
    registers the study page; the dashboard imports nothing above it).

    ``detect(dir)``: this page handles ``dir``; ``render(dir, title, live_interval_s, version)``
    -> HTML (``title`` None = the page's own); ``signature(dir)``: changes when the page would;
    ``after_write(dir, figures)`` -> lines to print after the HTML was written (e.g. PNGs)."""

    name: str
    detect: Callable[[Path], bool]
    render: Callable[..., str]
    signature: Callable[[Path], object]
    after_write: Callable[[Path, bool], list] = lambda d, figures: []


#: the registered directory pages, asked in order
DIRECTORY_PAGES: list[DirectoryPage] = []


def register_directory_page(page: DirectoryPage) -> None:
    if all(p.name != page.name for p in DIRECTORY_PAGES):
        DIRECTORY_PAGES.append(page)


def directory_page(run_dirs: list) -> Optional[tuple[DirectoryPage, Path]]:
    """The registered page for ``run_dirs`` when it is one directory such a page handles."""
    if len(run_dirs) != 1:
        return None
    d = Path(run_dirs[0])
    return next(((p, d) for p in DIRECTORY_PAGES if p.detect(d)), None)


def study_dir(run_dirs: list) -> Optional[Path]:
    """The directory when ``run_dirs`` is one directory a registered page handles (a study)."""
    found = directory_page(run_dirs)
    return found[1] if found is not None else None


def render(run_dirs: list, *, title: str = DEFAULT_TITLE, window: int = 0,
           live_interval_s: Optional[float] = None, version: str = "") -> str:
    found = directory_page(run_dirs)
    if found is not None:
        page, d = found
        return page.render(d, title=None if title == DEFAULT_TITLE else title,
                           live_interval_s=live_interval_s, version=version)
    runs = load_runs(run_dirs, PALETTE)
    return build_report(runs, title=title, window=window, live_interval_s=live_interval_s,
                        version=version)


def _version(run_dirs: list) -> str:
    found = directory_page(run_dirs)
    if found is not None:
        sig = found[0].signature(found[1])
    else:
        sig = run_signature(run_dirs)
    return hashlib.sha1(repr(sig).encode()).hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic: a browser never sees half a report


class _LiveReport:
    """Regenerates the page when the runs' files change (checked on each request)."""

    def __init__(self, run_dirs: list, output: Optional[Path], **kw):
        self.run_dirs, self.output, self.kw = run_dirs, output, kw
        self.lock = threading.Lock()
        self.version, self.html = None, ""

    def current(self) -> tuple[str, str]:
        with self.lock:
            v = _version(self.run_dirs)
            if v != self.version:
                self.html = render(self.run_dirs, version=v, **self.kw)
                self.version = v
                if self.output is not None:
                    _write(self.output, self.html)
            return self.version, self.html


def make_server(run_dirs: list, *, port: int = DEFAULT_PORT, output: Optional[Path] = None,
                refresh_s: float = DEFAULT_REFRESH_S, title: str = DEFAULT_TITLE,
                window: int = 0, quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0 = any free port; see ``server.server_port``)
    serving ``/`` (the live report) and ``/__version`` (changes when the data changes)."""
    live = _LiveReport(run_dirs, output, title=title, window=window, live_interval_s=refresh_s)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                _, body = live.current()
                self._send(200, "text/html; charset=utf-8", body.encode("utf-8"))
            elif path == "/__version":
                v, _ = live.current()
                self._send(200, "text/plain; charset=utf-8", v.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, code: int, ctype: str, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # noqa: A002
            if not quiet:
                super().log_message(fmt, *args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.live = live  # type: ignore[attr-defined]
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drpo dashboard",
        description="Build a self-contained HTML mismatch report from one or more run "
                    "directories (overlaying runs, e.g. BF16 vs FP8 rollout vs FP8 end-to-end).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directory with config.yaml and metrics.jsonl (histograms.jsonl "
                        "optional), or one `drpo study` directory (it holds study.yaml): the "
                        "study page, per condition each method's curves as mean and spread over "
                        "seeds and the summary table")
    p.add_argument("-o", "--output", default=None,
                   help="HTML file to write (default: report.html; for a study directory "
                        "STUDY_DIR/report.html)")
    p.add_argument("--no-figures", action="store_true",
                   help="study directory: do not write the PNG figures to STUDY_DIR/figures/")
    p.add_argument("--title", default=DEFAULT_TITLE, help="page title")
    p.add_argument("--window", type=int, default=0,
                   help="bar charts average the last N steps of each run (default 0 = all)")
    p.add_argument("--serve", action="store_true",
                   help="serve the report on 127.0.0.1 and reload it while the runs write")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="port for --serve (default %(default)s; 0 = any free port)")
    p.add_argument("--refresh", type=float, default=DEFAULT_REFRESH_S,
                   help="seconds between the live page's checks for new data (default %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        parser.error("not a run directory: " + ", ".join(missing))
    if args.window < 0 or args.refresh <= 0:
        parser.error("--window must be >= 0 and --refresh > 0")
    study = study_dir(args.runs)
    out = Path(args.output or (study / "report.html" if study is not None else "report.html"))
    if out.is_dir():
        raise InputError(f"-o {str(out)!r} is a directory; give the report's file name, e.g. "
                         f"-o {out / 'report.html'}")
    if not args.serve:
        html = render(args.runs, title=args.title, window=args.window)
        _write(out, html)
        if study is None:
            print(f"wrote {out} ({len(html) / 1024:.0f} KiB, {len(args.runs)} run(s))")
            return 0
        print(f"wrote {out} ({len(html) / 1024:.0f} KiB, study {study})")
        for line in directory_page(args.runs)[0].after_write(study, not args.no_figures):
            print(line)
        return 0
    server = make_server(args.runs, port=args.port, output=out, refresh_s=args.refresh,
                         title=args.title, window=args.window, quiet=True)
    server.live.current()  # type: ignore[attr-defined]  # build (and write) once up front
    print(f"serving http://127.0.0.1:{server.server_port}/ (also writing {out}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
