"""Every field of a jsonl example reaches the reward (``MathProblem.meta``); the arithmetic
task's problems carry their answer and question."""

import json

from drpo_megatron.data.arithmetic import make_problems
from drpo_megatron.data.math import load_math_jsonl


def test_extra_jsonl_fields_pass_through(tmp_path):
    rows = [{"prompt": "2+2", "answer": 4, "id": "a", "max_chars": 9, "tags": ["easy"],
             "rubric": {"format": "boxed"}},
            {"prompt": "3+3", "answer": "6"}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_math_jsonl(p)
    assert a.meta == {"answer": "4", "id": "a", "max_chars": 9, "tags": ["easy"],
                      "rubric": {"format": "boxed"}}
    assert b.meta == {"answer": "6"}
    assert a == load_math_jsonl(p)[0]  # meta is not part of equality / hashing
    hash(a)


def test_arithmetic_problem_meta():
    p = make_problems(1, seed=0, max_operand=9)[0]
    assert p.meta == {"answer": p.answer, "question": p.question}
