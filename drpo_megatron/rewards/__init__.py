"""Rewards of the loop: ``reward.kind`` math_verify | function | http (docs/rewards.md).

:func:`build_scorer` turns the run config's ``reward`` section into a :class:`RewardScorer`, the
callable that scores a step's samples in place.  ``REWARDS`` / ``build_reward`` are the plain
``fn(response_text, reference_answer) -> float`` functions (math-verify on ``\\boxed{}``).

Attributes are imported on first use, so that the config loader can read
``drpo_megatron.rewards.config`` without importing math-verify / sympy.
"""

import importlib

_EXPORTS = {
    "REWARDS": "math_reward", "boxed_math_reward": "math_reward", "build_reward": "math_reward",
    "RewardConfig": "config", "HttpRewardConfig": "config", "RewardConfigError": "config",
    "RewardScorer": "scorer", "build_scorer": "scorer", "RewardError": "pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
