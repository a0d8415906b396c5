"""Binary math reward checked by math-verify (the DRPO paper's reward).

``boxed_math_reward(response, answer)`` is 1.0 when the last ``\\boxed{...}`` in the response is
mathematically equal to the reference answer according to ``math_verify``, else 0.0.  Responses
without a ``\\boxed{}`` answer get 0.0 (math-verify's parser would otherwise accept a bare
number anywhere in the text, which rewards format violations).
"""

from __future__ import annotations

from typing import Callable

# math_verify's verify() runs sympy under a signal-based timeout; a tiny budget is enough for
# integer/short-expression answers and bounds the worst case of a pathological response.
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


def boxed_math_reward(response: str, answer: str) -> float:
    from math_verify import LatexExtractionConfig, parse, verify

    content = last_boxed(response)
    if content is None or not content.strip():
        return 0.0
    gold = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=PARSE_TIMEOUT_S)
    pred = parse(f"$\\boxed{{{content}}}$", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=PARSE_TIMEOUT_S)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=PARSE_TIMEOUT_S) else 0.0


REWARDS: dict[str, Callable[[str, str], float]] = {"math_verify_boxed": boxed_math_reward}


def build_reward(name: str) -> Callable[[str, str], float]:
    if name not in REWARDS:
        raise ValueError(f"reward.name={name!r} is not a known reward; choose one of {sorted(REWARDS)}")
    return REWARDS[name]
