"""The report in a real browser: headless Chromium renders it, we read back what it drew.

* ``--dump-dom``: the page script records, per chart series, the length of the path the
  browser laid out (``data-drawn-length``) and counts drawn series / bars on <body>; the
  rendered DOM must also still carry each run's values.
* ``--screenshot``: the PNG must show every run's colour in quantity (plots are drawn, not
  just present in the file).

Chromium is part of the set-up (``bash scripts/install.sh`` installs it, .ci/apt-packages.txt):
without it these tests fail, naming what to install -- they never skip silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from _dashboard_dom import bars, line_series, parse

from drpo_megatron.dashboard import main

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)


@pytest.fixture(autouse=True, scope="module")
def _chromium_installed():
    """Before the module's other fixtures (autouse fixtures of a scope come first)."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium not found (chromium, chromium-browser or google-chrome on "
                    "PATH): `bash scripts/install.sh` installs it (as root; or `apt-get install -y "
                    "chromium`, see .ci/apt-packages.txt)", pytrace=False)

CHROMIUM_TIMEOUT_S = 90  # two shared cores: allow for a slow first start
#: Each run's colour must cover at least this many pixels of the 1400x2600 screenshot (its lines
#: in ~16 charts, its bars, its legend chip); a page without plots has ~100 (chips, headers).
MIN_RUN_PIXELS = 3000


def _chromium(tmp_path, name, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"  # a new empty profile per run
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def page(three_runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    out = d / "report.html"
    assert main([str(r) for r in three_runs] + ["-o", str(out)]) == 0
    return d, out


def test_chromium_renders_every_series_with_the_runs_data(page, three_runs):
    d, out = page
    r = _chromium(d, "dom", "--virtual-time-budget=2000", "--dump-dom", out.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    root = parse(r.stdout)
    body = next(root.find_all("body"))
    total = int(body.attrs["data-series-total"])
    assert total > 60
    assert int(body.attrs["data-series-drawn"]) == total  # the browser drew every series
    assert int(body.attrs["data-bars-drawn"]) > 60
    for g in root.find_all("g", cls="series"):
        assert float(g.attrs["data-drawn-length"]) > 0, (g.attrs["data-key"], g.attrs["data-run"])

    # the rendered page still carries each run's numbers
    series = line_series(root, "mismatch/token_mult_prob_error")
    for run in three_runs:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        want = [[row["step"], row["mismatch/token_mult_prob_error"]] for row in rows]
        got = series[run.name]["points"]
        assert [p[0] for p in got] == [w[0] for w in want]
        assert [p[1] for p in got] == pytest.approx([w[1] for w in want], rel=1e-6)
        # mu-bin bars = mean over steps
        vals = [row["mismatch/by_mu/1e-1_1/logprob_abs_diff"] for row in rows]
        got_bar = bars(root, "mismatch/by_mu/*/logprob_abs_diff")[(run.name, "0.1–1")]
        assert got_bar == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    text = root.all_text()
    for label in ("FP8 rollout", "FP8 end-to-end", "BF16", "investigate > 1.05"):
        assert label in text


def _color_pixels(arr, hex_color, tol=40) -> int:
    """Pixels within L1 distance ``tol`` of ``hex_color`` in an [H, W, 3] uint8 array."""
    import numpy as np

    ref = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int32)
    return int((np.abs(arr.astype(np.int32) - ref).sum(-1) <= tol).sum())


def test_chromium_screenshot_shows_each_run(page, three_runs):
    Image = pytest.importorskip("PIL.Image")
    d, out = page
    png = d / "report.png"
    r = _chromium(d, "shot", "--window-size=1400,2600", f"--screenshot={png}", out.as_uri())
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    import numpy as np

    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 2600)
    arr = np.asarray(img)
    packed = (arr[..., 0].astype(np.int32) << 16) | (arr[..., 1].astype(np.int32) << 8) | arr[..., 2]
    assert len(np.unique(packed)) > 200  # not a blank page
    from drpo_megatron.dashboard.svg import PALETTE

    counts = {run.name: _color_pixels(arr, PALETTE[i]) for i, run in enumerate(three_runs)}
    for name, n in counts.items():
        assert n > MIN_RUN_PIXELS, f"{name}: only {n} pixels of its colour ({counts})"
