"""Reading run directories: torn lines, NaN / null, missing keys, resumes, configs."""

from __future__ import annotations

import json
import math

from _run_configs import resolved_config

from drpo_megatron.config import RunConfig
from drpo_megatron.dashboard.data import describe_config, load_run, load_runs, run_signature
from drpo_megatron.dashboard.svg import PALETTE
from drpo_megatron.weights.hf_export import ROLLOUT_PRECISIONS


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_tolerant_metrics_reading(tmp_path):
    lines = [
        '{"step": 0, "time": 100.0, "mismatch/logprob_abs_diff": 0.01, "loss/total": NaN}',
        '{"step": 0, "perf/step_time_s": 5.0}',  # same step again: merged
        '{"step": 1, "time": 101.0, "mismatch/logprob_abs_diff": null, "nested": {"a": 2}}',
        'garbage line',
        '{"no_step": 1}',
        '[1, 2]',
        '{"step": 2, "time": 102.0, "mismatch/logprob_abs_diff": Infinity, "s": "text"}',
        '{"step": 3, "mismatch/logprob_abs_d',  # torn last line of a live run
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    run = load_run(tmp_path)
    assert run.steps == [0, 1, 2]
    xs, ys = run.series("mismatch/logprob_abs_diff")
    assert xs == [0, 1, 2] and ys[0] == 0.01 and math.isnan(ys[1]) and ys[2] == math.inf
    assert math.isnan(run.scalars["loss/total"][0])
    assert run.scalars["perf/step_time_s"] == {0: 5.0}
    assert run.scalars["nested/a"] == {1: 2.0}
    assert "s" not in run.scalars
    assert run.has("mismatch/logprob_abs_diff") and not run.has("loss/total")
    assert any("2 unreadable" in p for p in run.problems), run.problems  # torn line not counted
    assert any("without a numeric 'step'" in p for p in run.problems)
    assert run.label == tmp_path.name and run.config == {}


def test_resume_replaces_the_later_timeline(tmp_path):
    _write(tmp_path / "metrics.jsonl",
           [{"step": s, "x": float(s)} for s in range(6)]
           + [{"step": s, "x": 100.0 + s} for s in range(3, 5)])  # resumed from step 3, now at 4
    _write(tmp_path / "histograms.jsonl",
           [{"step": s, "histograms": {"h": {"n": 1, "edges": [0, 1], "counts": [1]}}} for s in (0, 5)]
           + [{"step": 3, "histograms": {"h": {"n": 2, "edges": [0, 1], "counts": [2]},
                                          "bad": {"n": 2, "edges": [0], "counts": [2]}}}])
    run = load_run(tmp_path)
    assert run.resumes == [3]
    assert run.series("x") == ([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 103.0, 104.0])
    assert sorted(run.histograms["h"]) == [0, 3]  # step 5 belonged to the abandoned timeline
    assert "bad" not in run.histograms  # inconsistent edges / counts rejected
    assert run.latest_histogram("h")[0] == 3


def test_config_legend_fields(tmp_path):
    """The legend reads the real schema (name, model.hf_path, model.fp8, rollout.precision,
    loss.name / loss.params) of resolved configs, as drpo train writes them."""
    e2e = resolved_config("a", hf_path="/ckpt/Qwen/Qwen3-4B-Base", dtype="bf16", fp8="blockwise",
                          precision="fp8")
    assert describe_config(e2e) == {"name": "a", "model": "Qwen/Qwen3-4B-Base",
                                    "loss": "drpo (δ=12.5)", "precision": "FP8 end-to-end"}
    want = {"bf16": "BF16", "fp8": "FP8 rollout", "fp8_emulated": "FP8 rollout (emulated)",
            "nvfp4_emulated": "NVFP4 rollout (emulated)",
            "mxfp4_emulated": "MXFP4 rollout (emulated)"}
    assert set(want) == set(ROLLOUT_PRECISIONS)  # every precision a run can have has a word
    for precision, word in want.items():
        cfg = resolved_config("r", precision=precision)
        assert describe_config(cfg)["precision"] == word
    fp8_train = resolved_config("t", hf_path="/m/x", dtype="bf16", fp8="blockwise")
    assert describe_config(fp8_train)["precision"] == "FP8 training, BF16 rollout"
    # the embedded default: empty hf_path = the built-in tiny model
    assert describe_config(RunConfig().to_dict()) == {
        "name": "embedded-cpu-drpo", "model": "built-in tiny model", "loss": "drpo (δ=12.5)",
        "precision": "BF16"}
    losses = [("ppo_clip", {"eps_low": 0.2, "eps_high": 0.28}, "ppo_clip (eps_low=0.2, eps_high=0.28)"),
              ("spo", {"epsilon": 12.5}, "spo (ε=12.5)"), ("cispo", {}, "cispo"),
              ("pg_is", {}, "pg_is"), ("dppo_kl", {"delta": 0.05}, "dppo_kl (δ=0.05)")]
    for name, params, word in losses:
        assert describe_config(resolved_config("l", loss=name, params=params))["loss"] == word
    assert describe_config({}) == {"name": "", "model": "", "loss": "", "precision": ""}
    assert describe_config(None)["precision"] == ""  # type: ignore[arg-type]

    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (a / "config.yaml").write_text("name: same\nmodel: {hf_path: /m/org/tiny-moe}\n")
    (b / "config.yaml").write_text("name: same\n")
    (c / "config.yaml").write_text("name: [unclosed\n")
    runs = load_runs([a, b, c], PALETTE)
    assert [r.label for r in runs] == ["same", "same (2)", "c"]
    assert [r.color for r in runs] == list(PALETTE[:3])
    assert runs[0].info["model"] == "org/tiny-moe"
    assert any("unreadable" in p for p in runs[2].problems)
    assert any("no metrics.jsonl" in p for p in runs[2].problems)
    sig = run_signature([a])
    (a / "metrics.jsonl").write_text('{"step": 0}\n')
    assert run_signature([a]) != sig
