"""Offline HF <-> Megatron-Core checkpoint conversion (``drpo convert``); see
:mod:`drpo_megatron.convert.checkpoint`."""
