"""Resolved run configs for dashboard tests: what ``drpo train`` writes to config.yaml."""

from __future__ import annotations

from drpo_megatron.config import load_config


def resolved_config(name: str, *, hf_path: str = "", dtype: str = "fp32", fp8: str = "",
                    precision: str = "bf16", loss: str = "drpo",
                    params: dict | None = None) -> dict:
    """What ``drpo train`` writes to RUN_DIR/config.yaml (``load_config(...).to_dict()``, see
    ``run.setup_run_dir``) for a config that sets the fields telling runs apart
    (``parallel.device: cuda`` as the GPU configs in model_configs/ have, so no local path or
    CUDA check applies)."""
    return load_config(None, {
        "name": name, "output_dir": f"runs/{name}",
        "model": {"hf_path": hf_path, "dtype": dtype, "fp8": fp8},
        "rollout": {"precision": precision},
        "loss": {"name": loss, "params": {"delta": 12.5} if params is None else params},
        "parallel": {"device": "cuda"}}).to_dict()
