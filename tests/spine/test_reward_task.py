"""Reward parsing (math-verify on \\boxed{}) and the embedded arithmetic task."""

import pytest

from drpo_megatron.data.arithmetic import make_problems, train_eval_split
from drpo_megatron.rewards import boxed_math_reward, build_reward
from drpo_megatron.rewards.math_reward import last_boxed


@pytest.mark.parametrize("response,answer,expected", [
    ("\\boxed{42}", "42", 1.0),
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{42.0}", "42", 1.0),          # math-verify: numerically equal
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("42", "42", 0.0),                      # no \boxed{}: format violation
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{4", "4", 0.0),                # unterminated
    ("\\boxed{1}\\boxed{9}", "9", 1.0),     # the last boxed answer counts
    ("\\boxed{9}\\boxed{1}", "9", 0.0),
    ("\\boxed{\\frac{6}{3}}", "2", 1.0),
])
def test_boxed_math_reward(response, answer, expected):
    assert boxed_math_reward(response, answer) == expected


def test_last_boxed_nested_braces():
    assert last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert last_boxed("nothing") is None


def test_unknown_reward_names_choices():
    with pytest.raises(ValueError, match="math_verify_boxed"):
        build_reward("exact")


def test_problems_are_correct_distinct_and_split_disjoint():
    tr, ev = train_eval_split(300, 50, seed=3, max_operand=20)
    qs = [p.question for p in tr + ev]
    assert len(set(qs)) == len(qs) == 350
    for p in tr + ev:
        a, op, b = (p.question.partition("+") if "+" in p.question else
                    p.question.rpartition("-"))
        # "-" can appear only as the operator: operands are non-negative
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert make_problems(20, seed=1) == make_problems(20, seed=1)


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="num_problems=100 exceeds"):
        make_problems(100, seed=0, max_operand=3, ops="+")
