"""Reward functions in each form ``reward.function`` accepts (docs/rewards.md).

Per sample, ``reward.batched: false`` (the default)::

    def fn(prompt: str, response: str, meta: dict) -> float | dict

Batched, ``reward.batched: true`` (one call per ``reward.batch_size`` samples)::

    def fn(prompts: list[str], responses: list[str], metas: list[dict]) -> list[float | dict]

Either may be ``async def``.  ``meta`` holds the example's data-file fields (``answer`` always).
A dict result has the reward under ``score``; its other numeric fields are logged as
``rollout/reward/<field>``.
"""

from __future__ import annotations

import asyncio

from drpo_megatron.rewards.math_reward import last_boxed


def boxed_exact_match(prompt: str, response: str, meta: dict) -> dict:
    """1.0 when the last ``\\boxed{}`` holds exactly ``meta["answer"]`` (string equality);
    logs ``rollout/reward/has_box``."""
    box = last_boxed(response)
    return {"score": float(box is not None and box.strip() == str(meta["answer"]).strip()),
            "has_box": float(box is not None)}


def batched_exact_match(prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
    """:func:`boxed_exact_match`'s score for a batch (``reward.batched: true``)."""
    return [boxed_exact_match(p, r, m)["score"] for p, r, m in zip(prompts, responses, metas)]


async def async_exact_match(prompt: str, response: str, meta: dict) -> float:
    """An ``async def`` reward (e.g. one that awaits a remote judge): the samples of a worker's
    chunk (``reward.concurrency``) run concurrently on one event loop."""
    await asyncio.sleep(0)
    return boxed_exact_match(prompt, response, meta)["score"]
