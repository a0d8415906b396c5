"""The study page in a real browser (the pattern of tests/dashboard/test_browser.py): headless
Chromium lays it out, the page script records what it drew, and the dumped DOM must still
carry each method's mean curve.  Skipped when Chromium is absent (CI installs it:
.ci/apt-packages.txt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_study_report import STEPS, make_study, reward

import drpo_megatron.study  # noqa: F401 - registers the study page
from drpo_megatron.dashboard import main as dashboard_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dashboard"))
from _dashboard_dom import line_series, parse  # noqa: E402

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (apt-get install -y chromium; see .ci/apt-packages.txt)")

CHROMIUM_TIMEOUT_S = 90  # two shared cores: allow for a slow first start


def test_chromium_draws_every_method_curve(tmp_path):
    study = make_study(tmp_path)
    assert dashboard_main([str(study), "--no-figures"]) == 0
    page = study / "report.html"
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", "--virtual-time-budget=2000",
           "--dump-dom", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    root = parse(r.stdout)
    body = next(root.find_all("body"))
    total = int(body.attrs["data-series-total"])
    assert total >= 2 * 2 * 5  # 2 conditions with data x 2 methods x >= 5 metrics
    assert int(body.attrs["data-series-drawn"]) == total
    assert int(body.attrs["data-bars-drawn"]) >= 4  # final reward + mismatch bars
    for g in root.find_all("g", cls="series"):
        assert float(g.attrs["data-drawn-length"]) > 0, (g.attrs["data-key"], g.attrs["data-run"])
    series = line_series(root, "c2:rollout/reward_mean")
    for step, y in series["b"]["points"]:
        assert y == pytest.approx((reward("c2", "b", 1, step) + reward("c2", "b", 2, step)) / 2,
                                  rel=1e-6)
    assert len(series["b"]["points"]) == STEPS
