"""Write HF-named tensors as an HF checkpoint directory (safetensors shards + index + config),
atomically, with an optional per-precision transform (FP8 blockwise or FP8 emulation).

``ROLLOUT_PRECISIONS`` says what a rollout server receives:

* ``bf16``: the trainer's weights as they are (the server casts to its ``--dtype``).
* ``fp8_emulated``: 128x128 blockwise e4m3 quantize-then-dequantize of every linear weight
  (router, embeddings, LM head and norms untouched): the server runs in BF16 but carries exactly
  the FP8 weight error.  The CPU stand-in for FP8 rollouts.
* ``nvfp4_emulated`` / ``mxfp4_emulated``: the same modules quantize-then-dequantized to 4 bits
  (e2m1 values; NVFP4: an e4m3 scale per 16 elements and an fp32 per-tensor scale; MXFP4: a
  power-of-two E8M0 scale per 32; ``weights/fp4.py``): a harsher emulated mismatch.
* ``fp8``: the FP8 checkpoint layout SGLang's ``fp8`` loader reads (``X.weight`` e4m3 +
  ``X.weight_scale_inv`` fp32, ``quantization_config`` in config.json).  Needs a GPU server.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, get_args, Iterable, Iterator, Literal

import torch

from drpo_megatron.weights import fp4, fp8

#: rollout.precision: the weights the rollout servers run (see :func:`precision_transform`)
RolloutPrecision = Literal["bf16", "fp8_emulated", "nvfp4_emulated", "mxfp4_emulated", "fp8"]
ROLLOUT_PRECISIONS = get_args(RolloutPrecision)
SHARD_BYTES = 2 * 1024 ** 3  # safetensors shard size (HF's common 2 GB)
# Non-weight files copied from the source checkpoint (tokenizer, chat template, ...).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".safetensors.index.json", ".tmp")


def precision_transform(precision: str) -> Callable[[Iterable], Iterator] | None:
    if precision not in ROLLOUT_PRECISIONS:
        raise ValueError(f"rollout.precision={precision!r}: choose one of {list(ROLLOUT_PRECISIONS)}")
    return {"bf16": None, "fp8_emulated": fp8.emulate_fp8_named_tensors,
            "nvfp4_emulated": fp4.emulate_nvfp4_named_tensors,
            "mxfp4_emulated": fp4.emulate_mxfp4_named_tensors,
            "fp8": fp8.quantize_named_tensors}[precision]


def write_hf_checkpoint(named: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, *,
                        source_dir: str | os.PathLike, precision: str = "bf16",
                        write: bool = True) -> Path:
    """Write ``named`` (HF names -> full tensors) to ``out_dir`` replacing it atomically.

    ``source_dir``: the HF checkpoint whose config.json and tokenizer files are copied.
    ``write=False`` consumes the iterator without writing (non-zero ranks of a collective export).
    """
    from safetensors.torch import save_file

    transform = precision_transform(precision)
    stream = transform(named) if transform is not None else named
    out = Path(out_dir).resolve()
    if not write:
        for _ in stream:
            pass
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0
    shards: list[dict[str, torch.Tensor]] = []

    def flush():
        nonlocal shard, size
        if shard:
            idx = len(shards) + 1
            fname = f"model-{idx:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k in shard:
                weight_map[k] = fname
            shards.append({})
            shard, size = {}, 0

    for name, t in stream:
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    # single shard: HF's plain name; several: numbered shards + index
    if len(shards) == 1:
        os.rename(tmp / "model-00001.safetensors", tmp / "model.safetensors")
    else:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=1))
    src = Path(source_dir)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
    if precision == "fp8":
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = fp8.fp8_quantization_config()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
