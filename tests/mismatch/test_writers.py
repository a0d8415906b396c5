"""Metric writers: JSONL, TensorBoard (read back with EventAccumulator), W&B offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from drpo_megatron.mismatch.writers import (WRITERS, JsonlWriter, MetricWriter, MultiWriter,
                                            TensorBoardWriter, build_writers)


def test_jsonl_writer_lines_nan_and_histograms(tmp_path):
    with JsonlWriter(tmp_path) as w:
        assert isinstance(w, MetricWriter)
        w.log_scalars(0, {"mismatch/logprob_abs_diff": torch.tensor(0.011), "loss/total": 1,
                          "bad": float("nan"), "inf": float("inf"), "np": np.float32(2.5),
                          "skip": "text"})
        w.log_scalars(1, {"mismatch/logprob_abs_diff": 0.02})
        w.log_histograms(1, {"mismatch/logprob_abs_diff": torch.tensor([0.0, 1e-5, 1e-2, 0.5]),
                             "mismatch/drpo_weight": torch.tensor([0.9, 1.0, 1.1])})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert rows[0]["step"] == 0 and isinstance(rows[0]["time"], float)
    assert rows[0]["mismatch/logprob_abs_diff"] == pytest.approx(0.011)
    assert rows[0]["bad"] is None and rows[0]["inf"] is None and rows[0]["np"] == 2.5
    assert "skip" not in rows[0]
    assert rows[1] == {"step": 1, "time": rows[1]["time"], "mismatch/logprob_abs_diff": 0.02}
    h = json.loads((tmp_path / "histograms.jsonl").read_text())
    assert h["step"] == 1
    gap = h["histograms"]["mismatch/logprob_abs_diff"]
    assert gap["scale"] == "log" and gap["zeros"] == 1 and sum(gap["counts"]) == 3
    wt = h["histograms"]["mismatch/drpo_weight"]
    assert wt["scale"] == "linear" and sum(wt["counts"]) == 3 and wt["min"] == pytest.approx(0.9)
    # append mode: a resumed run continues the file
    with JsonlWriter(tmp_path) as w:
        w.log_scalars(2, {"x": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_tensorboard_writer_roundtrip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = TensorBoardWriter(tmp_path)
    for step in range(3):
        w.log_scalars(step, {"mismatch/logprob_abs_diff": 0.01 * (step + 1), "n": float("nan")})
    w.log_histograms(2, {"mismatch/logprob_abs_diff": torch.tensor([0.1, 0.2, float("nan"), 0.3])})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    ev = acc.Scalars("mismatch/logprob_abs_diff")
    assert [e.step for e in ev] == [0, 1, 2]
    assert [e.value for e in ev] == pytest.approx([0.01, 0.02, 0.03])
    assert math.isnan(acc.Scalars("n")[0].value)
    hist = acc.Histograms("mismatch/logprob_abs_diff")
    assert hist[0].step == 2 and hist[0].histogram_value.num == 3  # NaN dropped
    assert hist[0].histogram_value.max == pytest.approx(0.3)


def test_wandb_offline_writer(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = build_writers(["wandb", "jsonl"], tmp_path, wandb_project="drpo-test",
                      wandb_name="unit", wandb_config={"loss": {"name": "drpo"}}, strict=True)
    w.log_scalars(0, {"mismatch/logprob_abs_diff": 0.0123, "mismatch/token_mult_prob_error": 1.01})
    w.log_histograms(0, {"mismatch/drpo_weight": torch.linspace(0.9, 1.1, 50)})
    w.log_scalars(1, {"mismatch/logprob_abs_diff": 0.0456})
    w.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for needle in (b"mismatch/logprob_abs_diff", b"0.0456", b"0.0123", b"mismatch/drpo_weight",
                   b"histogram", b"drpo-test"):
        assert needle in data, needle
    assert (tmp_path / "metrics.jsonl").exists()
    # "disabled" writes nothing and must not wait for a run file on close
    from drpo_megatron.mismatch.writers import WandbWriter

    d = WandbWriter(tmp_path / "off", "drpo-test", mode="disabled")
    d.log_scalars(0, {"x": 1.0})
    assert d.sync_file is None
    d.close()


def test_build_writers_names_and_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        build_writers(["jsonl", "mlflow"], tmp_path)
    assert "'mlflow'" in str(e.value)
    for name in WRITERS:
        assert name in str(e.value)
    with pytest.raises(TypeError, match="prefix"):
        build_writers(["jsonl"], tmp_path, project="x")
    w = build_writers("jsonl, tb ,JSONL", tmp_path, wandb_project="ignored-unless-selected")
    assert [type(x).__name__ for x in w.writers] == ["JsonlWriter", "TensorBoardWriter"]
    w.close()
    assert build_writers([], tmp_path).writers == []


def test_multiwriter_isolates_a_failing_writer(tmp_path, caplog):
    class Broken:
        def log_scalars(self, step, metrics):
            raise RuntimeError("network down")

        def log_histograms(self, step, tensors):
            raise RuntimeError("network down")

        def close(self):
            pass

    good = JsonlWriter(tmp_path)
    m = MultiWriter([Broken(), good])
    m.log_scalars(0, {"a": 1.0})
    m.log_scalars(1, {"a": 2.0})
    m.log_histograms(1, {"h": torch.ones(3)})
    m.close()
    assert m.failures == {"Broken": 3}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "network down" in caplog.text
    with pytest.raises(RuntimeError):
        MultiWriter([Broken()], strict=True).log_scalars(0, {"a": 1.0})
