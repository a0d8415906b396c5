"""The custom reward of ``tiny_qwen3_moe_cpu_custom_reward.yaml`` (``reward.kind: function``).

``format_exact_match(prompt, response, meta)``: exact match on a strict format, length-aware.

* 1.0 when the whole response is ``\\boxed{<answer>}`` (surrounding whitespace allowed) with the
  answer equal to ``meta["answer"]`` as a string (no math-verify: "6.0" is not "6");
* 0.5 when a ``\\boxed{<answer>}`` with the right answer sits inside other text;
* 0.0 otherwise;
* minus ``LENGTH_PENALTY`` per character beyond the example's ``max_chars`` (a jsonl field of the
  example when it has one, else ``DEFAULT_MAX_CHARS``).

It returns a dict: ``score`` is the reward, the other fields are logged per step as
``rollout/reward/format_ok``, ``rollout/reward/correct`` and ``rollout/reward/over_budget_chars``.
"""

from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 12  # "\boxed{-18}" is 11 characters: the arithmetic task's longest answer
LENGTH_PENALTY = 0.05  # per character over the budget
BOXED_ONLY = re.compile(r"\s*\\boxed\{([^{}]*)\}\s*")
BOXED_ANY = re.compile(r"\\boxed\{([^{}]*)\}")


def format_exact_match(prompt: str, response: str, meta: dict) -> dict:
    answer = str(meta["answer"]).strip()
    whole = BOXED_ONLY.fullmatch(response)
    format_ok = whole is not None
    correct = (whole.group(1).strip() == answer if format_ok else
               any(m.strip() == answer for m in BOXED_ANY.findall(response)))
    score = 1.0 if (format_ok and correct) else 0.5 if correct else 0.0
    over = max(0, len(response) - int(meta.get("max_chars", DEFAULT_MAX_CHARS)))
    return {"score": score - LENGTH_PENALTY * over, "format_ok": float(format_ok),
            "correct": float(correct), "over_budget_chars": float(over)}
