"""The math task loader (drpo_megatron/data/math.py): jsonl parsing, prompts, errors, filtering."""

from __future__ import annotations

import json

import pytest

from drpo_megatron.config import TaskConfig
from drpo_megatron.data.math import (DEFAULT_PROMPT_TEMPLATE, DataError, drop_long_prompts,
                                     encode_prompt, load_math_jsonl, load_task)
from drpo_megatron.models.tiny import build_tokenizer, prompt_ids


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_rows_sources_and_prompt(tmp_path):
    f = _write(tmp_path / "aime_2024.jsonl", [{"prompt": "Find x.", "answer": 7},
                                              "",
                                              {"prompt": "Find y.", "answer": "1/2", "source": "s"}])
    probs = load_math_jsonl(f)
    assert [(p.problem, p.answer, p.source) for p in probs] == [
        ("Find x.", "7", "aime_2024"), ("Find y.", "1/2", "s")]
    assert probs[0].prompt_text == ("Find x.\n\nPlease reason step by step, and put your final "
                                    "answer within \\boxed{}.")
    assert load_math_jsonl(f, template="Q: {problem}", source="x")[1].prompt_text == "Q: Find y."
    assert load_math_jsonl(f, source="x")[1].source == "x"


@pytest.mark.parametrize("rows,where", [
    (["{not json"], ":1: not JSON"),
    ([{"prompt": "a", "answer": 1}, {"prompt": "b"}], ":2: needs a non-empty string 'prompt'"),
    ([{"prompt": " ", "answer": 1}], ":1: needs"),
    ([], ": no problems"),
])
def test_malformed_files_name_file_and_line(tmp_path, rows, where):
    f = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="d.jsonl" + where.replace("(", r"\(")):
        load_math_jsonl(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="prepare_math_data"):
        load_math_jsonl(tmp_path / "nope.jsonl")


def test_drop_long_prompts_and_encode():
    tok = build_tokenizer()
    probs = load_task(TaskConfig(num_train=4, num_eval=2), tok)[0]  # arithmetic
    assert len(probs) == 4
    # the tiny tokenizer has a chat template: encode_prompt is the chat-wrapped user turn
    assert encode_prompt(tok, "1+2=") == prompt_ids(tok, "1+2=")
    tok.chat_template = None
    plain = encode_prompt(tok, "1+2=")
    assert plain == tok("1+2=", add_special_tokens=False)["input_ids"] and len(plain) == 4
    enc = lambda t: list(range(len(t)))  # noqa: E731  one token per character
    from drpo_megatron.data.math import MathProblem

    ps = [MathProblem("a" * n, "1", template="{problem}") for n in (3, 5, 9)]
    assert drop_long_prompts(ps, enc, 5, "f") == ps[:2]
    assert drop_long_prompts(ps, enc, 0, "f") == ps
    with pytest.raises(DataError, match="max_prompt_tokens=2"):
        drop_long_prompts(ps, enc, 2, "f")


def test_load_task_math_per_source(tmp_path):
    train = _write(tmp_path / "dapo.jsonl", [{"prompt": f"What is {i}+1?", "answer": i + 1}
                                             for i in range(5)])
    a24 = _write(tmp_path / "aime_2024.jsonl", [{"prompt": "P1", "answer": 1}])
    a25 = _write(tmp_path / "aime_2025.jsonl", [{"prompt": "P2", "answer": 2},
                                                {"prompt": "P3 " * 50, "answer": 3}])
    task = TaskConfig(kind="math", train_file=str(train), eval_files=[str(a24), str(a25)],
                      max_prompt_tokens=60, prompt_template="{problem} Answer in \\boxed{{}}.")
    tr, ev = load_task(task, build_tokenizer())
    assert [p.answer for p in tr] == ["1", "2", "3", "4", "5"]
    assert [(p.source, p.answer) for p in ev] == [("aime_2024", "1"), ("aime_2025", "2")]
    assert ev[0].prompt_text == "P1 Answer in \\boxed{}."
    assert DEFAULT_PROMPT_TEMPLATE.format(problem="Q").endswith("\\boxed{}.")
