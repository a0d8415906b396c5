"""drpo-megatron: DRPO RL post-training on Megatron-Core with SGLang rollouts."""
__version__ = "0.1.0"
