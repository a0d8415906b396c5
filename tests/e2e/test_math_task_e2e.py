"""`drpo train` with ``task.kind: math``: jsonl problems (the tools/prepare_math_data.py format),
the prompt template, and avg@k per evaluation file, through the real loop (SGLang CPU server,
Megatron actor).  The problems are arithmetic written as text, so the embedded tiny policy can
answer some of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # the loader: tests/data (fast)



def _jsonl(path: Path, pairs) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": a + b}) + "\n"
                            for a, b in pairs))
    return str(path)


def test_math_task_trains_and_reports_avg_at_k_per_file(tmp_path, drpo_train):
    cfg = {
        "model": {"cache_dir": str(tmp_path / "cache"), "tiny": {"sft_steps": 60}},
        "task": {"kind": "math", "prompt_template": "{problem}=",
                 "train_file": _jsonl(tmp_path / "train.jsonl", [(1, 2), (3, 4), (2, 2), (5, 1)]),
                 "eval_files": [_jsonl(tmp_path / "aime_a.jsonl", [(1, 1), (2, 3)]),
                                _jsonl(tmp_path / "aime_b.jsonl", [(4, 4)])]},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 12},
        "loss": {"horizon": 12},
        "optim": {"updates_per_rollout": 1},
        "train": {"max_steps": 2, "eval_every": 2, "eval_samples_per_prompt": 4},
        "logging": {"writers": ["jsonl"]},
    }
    drpo_train(cfg, tmp_path, name="run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    # the training prompts are the train file's problems, in the template, as the rollout saw them
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(next((tmp_path / "cache").glob("tiny-qwen3-moe-*")))
    seen = {tok.decode(r["prompt_ids"]) for r in rows}
    assert all(any(f"{q}=" in s for q in ("1+2", "3+4", "2+2", "5+1")) for s in seen)
    assert {r["answer"] for r in rows} <= {"3", "7", "4", "6"}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/avg@4" in m]
    assert [m["step"] for m in evals] == [0, 2]  # before training and every eval_every steps
    for m in evals:
        a, b = m["eval/aime_a/avg@4"], m["eval/aime_b/avg@4"]
        # 8 samples of file a, 4 of file b: the overall avg@4 is their sample-weighted mean
        assert m["eval/avg@4"] == pytest.approx((8 * a + 4 * b) / 12)
        assert all(v * 4 == int(v * 4) for v in (b,))
