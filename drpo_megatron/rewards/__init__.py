"""Reward functions: ``REWARDS`` maps a name to ``fn(response_text, reference_answer) -> float``."""

from drpo_megatron.rewards.math_reward import REWARDS, boxed_math_reward, build_reward

__all__ = ["REWARDS", "boxed_math_reward", "build_reward"]
