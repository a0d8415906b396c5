"""Reward functions for the scorer tests, loaded by file path (``tests/rewards/reward_fns.py:NAME``)
like a user's reward file next to a config."""

import asyncio
import math
import os
import threading
import time


def echo_len(prompt, response, meta):
    """score = len(response); extras: the meta's 'weight' field and the prompt's length."""
    return {"score": float(len(response)), "weight": meta.get("weight", 0.0),
            "prompt_chars": len(prompt), "label": "text extras are kept, not averaged"}


def sleepy(prompt, response, meta):
    """Sleeps the seconds written in the response (a 'slow' reward), then 1.0."""
    time.sleep(float(response))
    return 1.0


def busy(prompt, response, meta):
    """A pure-C loop no signal interrupts: a huge integer power, then 1.0."""
    return float(pow(7, 7 ** 10) > 0) if response == "hang" else 2.0


def nan_reward(prompt, response, meta):
    return math.nan if response == "bad" else 1.0


def str_reward(prompt, response, meta):
    return "one" if response == "bad" else 1.0


def raising(prompt, response, meta):
    if response == "bad":
        raise KeyError("no such field")
    return 1.0


def dies(prompt, response, meta):
    if response == "bad":
        os._exit(3)
    return 1.0


def lock(prompt, response, meta):
    """Returns something pickle cannot send back."""
    return threading.Lock() if response == "bad" else 1.0


def batched_len(prompts, responses, metas):
    return [float(len(r)) for r in responses]


def batched_short(prompts, responses, metas):
    return [1.0] * (len(responses) - 1)


async def async_sleepy(prompt, response, meta):
    await asyncio.sleep(float(response))
    return float(response)


async def async_blocking(prompt, response, meta):
    """Blocks its event loop (never awaits): only the worker kill stops it."""
    time.sleep(float(response))
    return 1.0


async def async_batched(prompts, responses, metas):
    await asyncio.sleep(0)
    return [float(len(r)) for r in responses]


def two_args(prompt, response):
    return 1.0


NOT_CALLABLE = 3
