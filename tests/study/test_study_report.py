"""The study page of ``drpo dashboard DIR`` and the PNG figures, on a synthetic study directory
whose per-seed numbers are known: every drawn mean / band and every summary cell is checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from drpo_megatron.dashboard import main as dashboard_main
from drpo_megatron.study.report import build_study_report
from drpo_megatron.study.results import load_study
from drpo_megatron.study.spec import RESOLVED_SPEC_FILE, plan_runs, resolved_spec, spec_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dashboard"))
from _dashboard_dom import line_series, parse  # noqa: E402

STEPS = 12


def reward(cond: str, meth: str, seed: int, step: int) -> float:
    """Known curves: method b collapses in condition c2 for seed 1 (from step 3 on)."""
    if (cond, meth, seed) == ("c2", "b", 1) and step >= 3:
        return 0.05
    return 0.1 * (1 + (meth == "b")) + 0.05 * step / STEPS + 0.01 * seed


def make_study(root: Path) -> Path:
    spec = spec_from_dict({
        "name": "synthetic", "description": "a synthetic study", "seeds": [1, 2],
        "base": {"overrides": {"train": {"max_steps": STEPS}}},
        "methods": [{"name": "a", "loss": {"name": "drpo"}}, {"name": "b", "loss": {"name": "pg_is"}}],
        "conditions": [{"name": "c1"}, {"name": "c2", "overrides": {"rollout": {"precision": "nvfp4_emulated"}}},
                       {"name": "c3"}],
        "analysis": {"final_window": 4, "smooth": 2, "target_reward": 0.25,
                     "collapse": {"reward_floor": 0.1, "patience": 5}}})
    out = root / "study"
    out.mkdir()
    (out / RESOLVED_SPEC_FILE).write_text(yaml.safe_dump(resolved_spec(spec, commit="abc123")))
    for r in plan_runs(spec, out):
        if r.condition == "c3" or (r.condition, r.method, r.seed) == ("c1", "a", 2):
            continue  # not started
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "config.yaml").write_text(yaml.safe_dump(r.config, sort_keys=False))
        rows = [{"step": 0, "eval/accuracy": 0.2}]
        for s in range(1, STEPS + 1):
            row = {"step": s, "rollout/reward_mean": reward(r.condition, r.method, r.seed, s),
                   "loss/policy_loss": 0.01, "loss/grad_norm": 1.0,
                   "rollout/truncated_frac": 0.0,
                   "mismatch/logprob_abs_diff": (1e-3 if r.condition == "c1" else 5e-3) * r.seed}
            if s % 6 == 0:
                row["eval/accuracy"] = 0.2 + 0.01 * s + 0.1 * r.seed
            rows.append(row)
        (r.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("study"))


def test_cells_and_curves(study):
    res = load_study(study)
    assert res.conditions == ["c1", "c2", "c3"] and res.methods == ["a", "b"]
    assert res.states["c1/a/seed2"].state == "new" and res.states["c1/a/seed1"].state == "interrupted"
    # final reward: mean of the last 4 steps (9..12) per seed, then over seeds
    def fin(c, m, s):
        return sum(reward(c, m, s, k) for k in range(9, 13)) / 4
    cell = res.cells[("c1", "b")]
    want = [fin("c1", "b", 1), fin("c1", "b", 2)]
    assert cell.final_reward[0] == pytest.approx(sum(want) / 2)
    assert cell.final_reward[1] == pytest.approx(abs(want[0] - want[1]) / math.sqrt(2))
    assert res.cells[("c1", "a")].final_reward[2] == 1           # seed 2 not started
    assert res.cells[("c3", "a")].final_reward[2] == 0
    # collapse: c2/b seed 1 drops to 0.05 < 0.5 x 0.21 from step 3 for 5+ steps
    c2b = res.cells[("c2", "b")]
    assert c2b.collapses == 1 and c2b.seeds[0].collapse.step == 3
    assert c2b.seeds[0].collapse.reason == "reward" and c2b.seeds[1].collapse is None
    assert res.cells[("c2", "a")].collapses == 0
    # eval: last logged eval/accuracy (step 12) = 0.32 + 0.1 * seed
    assert res.cells[("c1", "b")].final_eval[0] == pytest.approx(0.32 + 0.15)
    assert res.cells[("c2", "a")].mismatch_mean[0] == pytest.approx(7.5e-3)
    # target 0.25 (2-step mean): a never (<= 0.16); b: 0.2 + 0.01 seed + (2s - 1) / 480 >= 0.25
    # -> 2s - 1 >= 19.2 (seed 1): s = 11; >= 14.4 (seed 2): s = 8
    assert res.cells[("c1", "a")].steps_to_target == [None]
    assert res.cells[("c1", "b")].steps_to_target == [11, 8]
    c = res.curves[("c1", "b", "rollout/reward_mean")]
    assert c.steps == list(range(1, STEPS + 1)) and c.n == [2] * STEPS
    assert c.mean[0] == pytest.approx((reward("c1", "b", 1, 1) + reward("c1", "b", 2, 1)) / 2)


def test_page_draws_mean_and_spread_per_method(study):
    res = load_study(study)
    root = parse(build_study_report(res))
    for cond in ("c1", "c2"):
        series = line_series(root, f"{cond}:rollout/reward_mean")
        assert set(series) == {"a", "b"}
        for meth in ("a", "b"):
            seeds = [s for s in (1, 2) if (cond, meth, s) != ("c1", "a", 2)]
            pts = series[meth]["points"]
            assert [p[0] for p in pts] == list(range(1, STEPS + 1))
            for step, y in pts:
                vals = [reward(cond, meth, s, step) for s in seeds]
                assert y == pytest.approx(sum(vals) / len(vals), rel=1e-6)
            band = json.loads(next(root.find_all("figure", data_key=f"{cond}:rollout/reward_mean"))
                              .find_all("g", cls="series", data_run=meth).__next__()
                              .find_all("path", cls="band").__next__().attrs["data-band"])
            for step, lo, hi in band:
                vals = [reward(cond, meth, s, step) for s in seeds]
                assert (lo, hi) == pytest.approx((min(vals), max(vals)), rel=1e-6)
    assert line_series(root, "c3:rollout/reward_mean") == {}      # no data yet: no chart
    assert set(line_series(root, "c2:eval/accuracy")) == {"a", "b"}
    # summary cells carry their numbers
    cells = {(td.attrs["data-cell"], td.attrs["data-field"]): td for td in root.find_all("td")
             if "data-cell" in td.attrs}
    assert float(cells[("c1/b", "final_reward")].attrs["data-mean"]) == pytest.approx(
        res.cells[("c1", "b")].final_reward[0], rel=1e-6)
    assert cells[("c2/b", "collapses")].attrs["data-count"] == "1"
    assert "collapsed" in cells[("c2/b", "collapses")].classes
    assert json.loads(cells[("c1/b", "steps_to_target")].attrs["data-steps"]) == [11, 8]
    assert "seed 1: reward at step 3" in cells[("c2/b", "collapses")].all_text()
    text = root.all_text()
    assert "nvfp4_emulated" in text and "a synthetic study" in text and "abc123" in text
    assert "Definitions" in text and "consecutive logged steps" in text


def test_dashboard_detects_a_study_and_writes_figures(study, tmp_path):
    assert dashboard_main([str(study)]) == 0
    page = (study / "report.html").read_text()
    assert 'data-study="synthetic"' in page and "<link" not in page
    import numpy as np
    from PIL import Image

    figs = sorted(p.name for p in (study / "figures").glob("*.png"))
    assert figs == ["c1.png", "c2.png", "final_reward.png", "mismatch.png"]  # c3: no data
    for name in figs:
        img = Image.open(study / "figures" / name)
        assert img.size[0] > 500 and img.size[1] > 300
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(rgb, axis=0)) > 50  # drawn, not blank
    # -o elsewhere, no figures
    out = tmp_path / "page.html"
    assert dashboard_main([str(study), "-o", str(out), "--no-figures"]) == 0
    assert 'data-study="synthetic"' in out.read_text()
