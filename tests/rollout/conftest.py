"""Fixtures shared by the rollout tests."""

import pytest


@pytest.fixture(scope="session")
def policy():
    """The embedded tiny policy (built once, cached in ``model.cache_dir``)."""
    from drpo_megatron.config import ModelConfig, TaskConfig
    from drpo_megatron.models.tiny import ensure_tiny_checkpoint

    m = ModelConfig()
    return ensure_tiny_checkpoint(m.cache_dir, m.tiny, max_operand=TaskConfig().max_operand,
                                  show_progress=False)
