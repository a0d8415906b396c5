"""The HTML report carries the runs' data (checked element by element), is self-contained,
and the CLI / live server work."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from _dashboard_dom import bars, line_series, parse

from drpo_megatron.dashboard import build_html, main
from drpo_megatron.dashboard.cli import make_server


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _values(run_dir, key):
    out = []
    for row in _jsonl(run_dir / "metrics.jsonl"):
        if key in row:
            v = row[key]
            out.append([row["step"], None if v is None or not math.isfinite(v) else v])
    return out


@pytest.fixture(scope="module")
def report(three_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main([str(d) for d in three_runs] + ["-o", str(out), "--title", "BF16 vs FP8"]) == 0
    html = out.read_text()
    return html, parse(html)


def test_self_contained(report):
    html, _ = report
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert not re.search(r"<script[^>]+src", html)
    assert "<title>BF16 vs FP8</title>" in html


def test_runs_legend_from_config(report):
    _, root = report
    rows = {r.find_all("b").__next__().all_text(): r.all_text() for r in root.find_all("tr", cls="run")}
    assert set(rows) == {"bf16", "fp8-rollout", "fp8-e2e"}
    assert "BF16" in rows["bf16"] and "Qwen3-30B-A3B-Base" in rows["bf16"]
    assert "FP8 rollout" in rows["fp8-rollout"] and "Qwen/Qwen3-30B-A3B-Base" in rows["fp8-rollout"]
    assert "FP8 end-to-end" in rows["fp8-e2e"] and "drpo (δ=0.5)" in rows["fp8-e2e"]


@pytest.mark.parametrize("key", ["mismatch/logprob_abs_diff", "mismatch/token_mult_prob_error",
                                 "mismatch/kl_k3_rollout_train", "mismatch/is_ess",
                                 "rollout/reward_mean", "loss/total", "perf/step_time_s",
                                 "mismatch/drpo_weight_below_one_frac"])
def test_line_charts_carry_each_runs_series(report, three_runs, key):
    _, root = report
    series = line_series(root, key)
    assert set(series) == {d.name for d in three_runs}
    for d in three_runs:
        got = series[d.name]["points"]
        want = _values(d, key)
        assert [p[0] for p in got] == [w[0] for w in want]
        for (_, g), (_, w) in zip(got, want):
            assert (g is None and w is None) or g == pytest.approx(w, rel=1e-6), key


def test_thresholds_marked(report):
    _, root = report
    fig = next(root.find_all("figure", data_key="mismatch/token_mult_prob_error"))
    th = {(t.attrs["data-kind"], float(t.attrs["data-value"])): t.attrs["data-source"]
          for t in fig.find_all("g", cls="threshold")}
    assert th[("warn", 1.05)] == "NeMo-RL"
    fig = next(root.find_all("figure", data_key="mismatch/logprob_abs_diff"))
    assert any(t.attrs["data-source"] == "slime" and float(t.attrs["data-value"]) == 0.011
               for t in fig.find_all("g", cls="threshold"))


def test_mu_bin_bars_are_means_over_steps(report, three_runs):
    _, root = report
    got = bars(root, "mismatch/by_mu/*/logprob_abs_diff")
    titles = {"lt_1e-4": "<1e-4", "1e-2_1e-1": "0.01–0.1", "1e-1_1": "0.1–1"}
    for d in three_runs:
        for b, title in titles.items():
            vals = [v for _, v in _values(d, f"mismatch/by_mu/{b}/logprob_abs_diff") if v is not None]
            assert got[(d.name, title)] == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    # the low-mu bin carries larger log-prob gaps than the top bin for the FP8 run
    assert len(bars(root, "mismatch/by_pos/*/logprob_abs_diff")) == 9
    assert len(bars(root, "mismatch/by_adv/*/logprob_abs_diff")) == 6


def test_histograms_and_time_breakdown(report, three_runs):
    _, root = report
    fig = next(root.find_all("figure", data_key="mismatch/drpo_weight", data_kind="hist"))
    hs = {g.attrs["data-run"]: g for g in fig.find_all("g", cls="series")}
    for d in three_runs:
        last = _jsonl(d / "histograms.jsonl")[-1]
        want = last["histograms"]["mismatch/drpo_weight"]
        assert json.loads(hs[d.name].attrs["data-counts"]) == want["counts"]
        assert json.loads(hs[d.name].attrs["data-edges"]) == pytest.approx(want["edges"])
        assert int(hs[d.name].attrs["data-step"]) == last["step"]
    q = line_series(root, "mismatch/logprob_abs_diff#quantiles")
    assert set(q) == {d.name for d in three_runs}
    stack = bars(root, "perf/*_time_s")
    assert stack[("bf16", "rollout")] == pytest.approx(6.0)
    assert stack[("fp8-e2e", "train")] == pytest.approx(3.0)
    assert stack[("fp8-e2e", "other")] == pytest.approx(0.4)


def test_health_table_and_sections(report, three_runs):
    html, root = report
    for sid in ("runs", "mismatch", "bins", "trust", "dist", "splits", "curves", "time", "all"):
        assert f'<section id="{sid}"' in html, sid
    assert '<section id="moe"' not in html  # no routing data in these runs
    for d in three_runs:
        vals = [v for _, v in _values(d, "mismatch/token_mult_prob_error")][-10:]
        cell = next(c for c in root.find_all("td", data_key="mismatch/token_mult_prob_error")
                    if c.ancestor("table") and c.attrs["data-run-idx"] ==
                    str([x.name for x in three_runs].index(d.name)))
        mean = sum(vals) / len(vals)
        assert float(cell.attrs["data-value"]) == pytest.approx(mean, rel=1e-5)
        assert ("h-bad" in cell.classes) == (mean > 1.05)


def test_moe_section_and_empty_run(tmp_path):
    run = tmp_path / "moe"
    run.mkdir()
    rows = [{"step": s, "mismatch/moe/route_mismatch_frac": 0.1 / (s + 1),
             "mismatch/moe/logprob_abs_diff_route_same": 0.01,
             "mismatch/moe/logprob_abs_diff_route_diff": 0.05,
             # per layer (rollout.routing_replay record / replay); layer 10 sorts after 2
             "mismatch/moe/layer_2/route_mismatch_frac": 0.2,
             "mismatch/moe/layer_10/route_mismatch_frac": 0.1 * s} for s in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty = tmp_path / "starting"
    empty.mkdir()
    html = build_html([str(run), str(empty)])
    root = parse(html)
    assert '<section id="moe"' in html
    assert line_series(root, "mismatch/moe/route_mismatch_frac")["moe"]["points"][3] == [3, 0.025]
    assert bars(root, "mismatch/moe/logprob_abs_diff_route_*")[("moe", "routing differs")] == 0.05
    by_layer = bars(root, "mismatch/moe/*/route_mismatch_frac")
    assert list(by_layer) == [("moe", "2"), ("moe", "10")]
    assert by_layer[("moe", "2")] == pytest.approx(0.2)
    assert by_layer[("moe", "10")] == pytest.approx(0.15)  # mean over the 4 steps
    assert "no metrics.jsonl yet" in html


def test_cli_errors_and_module_entry(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "not a run directory" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "drpo_megatron.dashboard", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--serve" in r.stdout and "RUN_DIR" in r.stdout


def test_serve_reloads_on_new_data(three_runs, tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "mismatch/logprob_abs_diff": 0.5}\n')
    out = tmp_path / "live.html"
    server = make_server([str(run)], port=0, output=out, refresh_s=1)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        get = lambda p: urllib.request.urlopen(base + p, timeout=10).read().decode()  # noqa: E731
        page, v1 = get("/"), get("/__version")
        assert 'data-live-interval="1"' in page and f'data-version="{v1}"' in page
        assert line_series(parse(page), "mismatch/logprob_abs_diff")["live"]["points"] == [[0, 0.5]]
        assert get("/__version") == v1  # unchanged data, same version
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 1, "mismatch/logprob_abs_diff": 0.25}\n')
        v2 = get("/__version")
        assert v2 != v1
        pts = line_series(parse(get("/")), "mismatch/logprob_abs_diff")["live"]["points"]
        assert pts == [[0, 0.5], [1, 0.25]]
        assert "0.25" in out.read_text()  # -o file kept current too
        with pytest.raises(urllib.error.HTTPError):
            get("/etc/passwd")
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_staleness_charts_sit_in_the_mismatch_section_for_async_runs(tmp_path):
    runs = {}
    for name, lag in (("async", 1.0), ("sync", 0.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "mismatch/logprob_abs_diff": 0.01 * (1 + lag),
                 "rollout/staleness_mean": lag * s / 3, "rollout/staleness_max": lag}
                for s in range(1, 4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = str(run)

    def mismatch_section(run):
        root = parse(build_html([run]))
        return next(s for s in root.find_all("section") if s.attrs.get("id") == "mismatch")

    mismatch = mismatch_section(runs["async"])
    assert line_series(mismatch, "rollout/staleness_mean")["async"]["points"][2] == [3, 1.0]
    assert line_series(mismatch, "rollout/staleness_max")
    # a sync run (staleness 0 throughout) gets none there
    assert not line_series(mismatch_section(runs["sync"]), "rollout/staleness_mean")
