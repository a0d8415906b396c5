"""The embedded CPU task: small integer arithmetic with ``\\boxed{}`` answers.

Deterministic for a seed; split into train and held-out eval sets with no overlap.  A problem is
``a+b`` or ``a-b`` with operands in ``[0, max_operand]``; the reference answer is the integer.
The prompt asks for the answer in ``\\boxed{}``; rewards are checked by math-verify.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    question: str  # e.g. "17+25"
    answer: str  # e.g. "42"

    @property
    def prompt_text(self) -> str:
        return f"{self.question}="

    @property
    def meta(self) -> dict[str, str]:
        """What the reward function sees of the problem (docs/rewards.md)."""
        return {"answer": self.answer, "question": self.question}

    @property
    def solution_text(self) -> str:
        return f"\\boxed{{{self.answer}}}"


def make_problems(n: int, *, seed: int, max_operand: int = 49, ops: str = "+-") -> list[Problem]:
    """``n`` distinct problems drawn with ``random.Random(seed)`` (raises if fewer exist)."""
    total = (max_operand + 1) ** 2 * len(ops)
    if n > total:
        raise ValueError(
            f"task.num_problems={n} exceeds the {total} distinct problems with max_operand="
            f"{max_operand} and ops={ops!r}; lower num_problems or raise max_operand"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(ops)
        q = f"{a}{op}{b}"
        if q in seen:
            continue
        seen.add(q)
        out.append(Problem(q, str(a + b if op == "+" else a - b)))
    return out


def train_eval_split(n_train: int, n_eval: int, *, seed: int, max_operand: int = 49,
                     ops: str = "+-") -> tuple[list[Problem], list[Problem]]:
    problems = make_problems(n_train + n_eval, seed=seed, max_operand=max_operand, ops=ops)
    return problems[:n_train], problems[n_train:]
