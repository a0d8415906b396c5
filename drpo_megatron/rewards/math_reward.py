"""Binary math reward checked by math-verify (the DRPO paper's reward).

``boxed_math_reward(response, answer)`` is 1.0 when the last ``\\boxed{...}`` in the response is
mathematically equal to the reference answer according to ``math_verify``, else 0.0.  Responses
without a ``\\boxed{}`` answer get 0.0 (math-verify's parser would otherwise accept a bare
number anywhere in the text, which rewards format violations).

In the loop (``reward.kind: math_verify``) the reward is :func:`math_verify_reward`, run in the
reward worker processes (:mod:`drpo_megatron.rewards.pool`) under ``reward.timeout_s`` per sample,
with math-verify's own ``signal.alarm`` timeouts off: the worker's hard kill is the limit, and it
is counted (``rollout/reward/timeout_count``) where math-verify's timeout would silently score 0.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from math_verify import LatexExtractionConfig, parse, verify

# Direct calls of boxed_math_reward (outside the worker pool) keep math-verify's signal-based
# timeout (main thread only); a tiny budget is enough for integer/short-expression answers.
PARSE_TIMEOUT_S = 2
BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    i = start + len(BOXED)
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def boxed_math_reward(response: str, answer: str, *,
                      timeout_s: int | None = PARSE_TIMEOUT_S) -> float:
    """1.0 / 0.0 (module docstring); ``timeout_s`` is math-verify's own per-step timeout (None:
    off, for callers that bound the call themselves)."""
    content = last_boxed(response)
    if content is None or not content.strip():
        return 0.0
    gold = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=timeout_s)
    pred = parse(f"$\\boxed{{{content}}}$", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=timeout_s)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout_s) else 0.0


def math_verify_reward(prompt: str, response: str, meta: dict[str, Any]) -> float:
    """``reward.kind: math_verify``: :func:`boxed_math_reward` against ``meta["answer"]``, with
    math-verify's signal timeouts off (the reward worker's hard time limit applies)."""
    return boxed_math_reward(response, str(meta["answer"]), timeout_s=None)


def _warmup() -> None:
    # in a reward worker: math-verify warns once that its timeout is off (the pool's limit
    # applies instead), and its first parse builds the LaTeX grammar (outside any time limit)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    boxed_math_reward("\\boxed{1}", "1", timeout_s=None)


math_verify_reward.warmup = _warmup  # called once by each new reward worker (rewards/pool.py)
MATH_VERIFY_SPEC = f"{__name__}:math_verify_reward"


REWARDS: dict[str, Callable[[str, str], float]] = {"math_verify_boxed": boxed_math_reward}


def build_reward(name: str) -> Callable[[str, str], float]:
    if name not in REWARDS:
        raise ValueError(f"reward.name={name!r} is not a known reward; choose one of {sorted(REWARDS)}")
    return REWARDS[name]
