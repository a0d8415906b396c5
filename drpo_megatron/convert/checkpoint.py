"""Offline HF <-> Megatron-Core checkpoint conversion through megatron-bridge, with verification.

``drpo convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N] [--dtype fp32|bf16]``
    Loads the HF checkpoint into a Megatron-Core GPTModel sharded TP x PP x EP (megatron-bridge
    maps the names), saves it with ``dist_checkpointing`` (torch_dist; the format of
    :func:`drpo_megatron.models.megatron_model.save_megatron_checkpoint`, which loads under any
    other TP/PP/EP layout), then **zeroes every parameter, reloads the saved checkpoint** and
    prints the max |logit difference| against the HF model (transformers) on sample prompts.

``drpo convert mcore-to-hf --mcore DIR --hf-config DIR --out DIR [--tp N --pp N --ep N]``
    Builds the model skeleton from ``--hf-config`` (a directory with config.json; the
    ``hf_config/`` copy that ``hf-to-mcore`` writes into its output is the default), loads the
    Megatron checkpoint (resharding to the requested layout), writes an HF checkpoint
    (safetensors + index + config + tokenizer files) and prints the max |logit difference|
    between the written HF model (re-read by transformers) and the Megatron model.

``drpo convert verify --mcore DIR --hf DIR [--dtype ...]``
    Loads an existing Megatron checkpoint and runs the same logits check against ``--hf``.

Output directory: ``--out`` is never deleted or overwritten.  An existing non-empty ``--out``
is refused unless ``--force``; ``--out`` equal to, inside, or containing a source directory is
always refused.  The conversion is written to ``OUT.converting`` (next to ``OUT``), verified,
and only then put in place: with ``--force`` the old ``OUT`` is exchanged with the new one in
one ``renameat2(RENAME_EXCHANGE)`` (two renames where the filesystem lacks it) and deleted after
the new one is in place.  A failed verification leaves ``OUT`` untouched and the unverified
result in ``OUT.converting`` (exit 1).

Verification bounds (on the logits of the sample prompts):

* fp32: max |logit diff| <= ``--atol`` (default 1e-4; measured ~2e-7 on the tiny models);
* bf16: the reference is transformers' **fp32** forward of the source; the Megatron bf16 model
  may differ from it by at most ``BF16_NOISE_FACTOR`` x the RMS difference that transformers'
  own bf16 model of the same weights shows on the same prompts (the bf16 noise floor of this
  model), so the bound scales with the model instead of a fixed absolute number that a wrong
  conversion (e.g. two experts swapped) passes.  ``tests/convert`` checks that a checkpoint
  with two experts swapped fails it.  ``--atol`` (when given) is an extra max-abs bound.

Output layout of ``hf-to-mcore``::

    OUT/                     torch_dist shards + metadata.json (+ common.pt)
    OUT/drpo_convert.json    {"source_hf", "tp", "pp", "ep", "etp", "dtype", "architecture", ...}
    OUT/hf_config/           config.json, generation_config.json, tokenizer files of the source

Parallelism: the conversion runs on ``nproc = pp * lcm(tp, ep * etp)`` processes (``etp``
defaults to ``tp``).  When that is > 1 and the command is not already under torchrun/srun, it
re-launches itself with ``python -m torch.distributed.run --nproc-per-node NPROC -m
drpo_megatron.cli convert ...`` on this host (``--no-spawn`` to refuse instead); for several
nodes start it yourself (``srun ... torchrun --nnodes ... -m drpo_megatron.cli convert ...``).

Supported architectures: :data:`ARCHITECTURES` (anything else fails before any process starts).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from drpo_megatron.dist import barrier, free_port
from drpo_megatron.errors import InputError
from drpo_megatron.training import checkpoint as ckpt

log = logging.getLogger(__name__)

# HF architecture -> what is known about it here.  "tested": converted and verified on CPU by
# tests/convert; "gpu": registered in megatron-bridge 0.6.2 but its Megatron layer spec needs
# Transformer Engine (not importable on CPU), so it is converted on a GPU node only.
ARCHITECTURES = {
    "Qwen3ForCausalLM": "tested (dense Qwen3, e.g. Qwen3-4B-Base)",
    "Qwen3MoeForCausalLM": "tested (Qwen3-MoE, e.g. Qwen3-30B-A3B-Base)",
    "Qwen2ForCausalLM": "tested (Qwen2, e.g. DeepSeek-R1-Distill-Qwen-1.5B)",
    "Qwen3_5MoeForCausalLM": "gpu (Qwen3.5-MoE hybrid Gated-DeltaNet; needs Transformer Engine)",
}
META_FILE = "drpo_convert.json"
HF_CONFIG_SUBDIR = "hf_config"
# Files of an HF directory that are not weights (copied along).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".tmp")
# fp32 verification: bound on max |logit diff| (measured ~2e-7 on the tiny models).
DEFAULT_ATOL_FP32 = 1e-4
# bf16 verification: the Megatron bf16 model's RMS logit error against the fp32 reference may be
# at most this many times transformers' own bf16 RMS error (the noise floor).  Measured on the
# tiny models of tests/convert: a correct conversion 1.0-1.6x, two experts of one layer swapped
# BF16_SWAP_MEASURED; see docs/operate.md.
BF16_NOISE_FACTOR = 3.0
STAGING_SUFFIX = ".converting"
STAGING_MARKER = ".drpo-convert-staging"  # written into OUT.converting: only such dirs are removed
SAMPLE_PROMPTS = (
    "What is 17 + 25? Put the final answer in \\boxed{}.",
    "Let x be a real number with x^2 = 49 and x > 0. Find x.",
    "Compute the sum of the first 10 positive integers.",
    "How many prime numbers are less than 20?",
)


class ConvertError(InputError):
    """A one-line user error: names the option, the value and the fix."""


# ------------------------------------------------------------------------------ validation


def read_hf_config(hf_dir: str | os.PathLike, option: str = "--hf") -> dict:
    d = Path(hf_dir).expanduser()
    cfg_file = d / "config.json"
    if not d.is_dir():
        raise ConvertError(f"{option} {str(hf_dir)!r}: directory not found; pass a local HF "
                           "checkpoint directory (download it first, no hub access here)")
    if not cfg_file.is_file():
        raise ConvertError(f"{option} {str(hf_dir)!r}: no config.json inside; pass the directory "
                           "that holds config.json and the *.safetensors files")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{option} {str(hf_dir)!r}: config.json is not valid JSON ({e}); "
                           "copy it again from the original checkpoint") from e


def check_architecture(cfg: dict, option: str = "--hf") -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            if ARCHITECTURES[a].startswith("gpu") and not _cuda():
                raise ConvertError(f"{option}: architectures={archs!r} is {ARCHITECTURES[a]}; run the "
                                   "conversion on a GPU node (CPU-convertible: "
                                   + ", ".join(k for k, v in ARCHITECTURES.items() if v.startswith("tested"))
                                   + ")")
            return a
    supported = ", ".join(ARCHITECTURES)
    raise ConvertError(f"{option}: architectures={archs!r} (model_type={cfg.get('model_type')!r}) "
                       f"is not supported; use a checkpoint of a supported architecture: {supported}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_layout(cfg: dict, tp: int, pp: int, ep: int, etp: int | None) -> None:
    """The shared layout check (:func:`drpo_megatron.models.layout.check_layout`) on the HF
    config's numbers, with the CLI's option names; on CPU (gloo) EP > 1 with ETP > 1 is refused
    here, before any process starts (it would fail in the first MoE forward)."""
    from drpo_megatron.models.layout import CLI_NAMES, LayoutError
    from drpo_megatron.models.layout import check_layout as layout_check

    c = cfg.get("text_config", cfg)
    heads = c.get("num_attention_heads", 0)
    try:
        layout_check(tp=tp, pp=pp, ep=ep, etp=etp, num_attention_heads=heads,
                     num_key_value_heads=c.get("num_key_value_heads", heads) or heads,
                     num_layers=c.get("num_hidden_layers", 0),
                     num_experts=c.get("num_experts", 0) or c.get("num_local_experts", 0) or 0,
                     gloo=not _cuda(), names=CLI_NAMES)
    except LayoutError as e:
        raise ConvertError(str(e)) from None


def world_size_for(tp: int, pp: int, ep: int, etp: int | None) -> int:
    """Smallest world Megatron accepts: divisible by tp*pp and by pp*ep*etp."""
    from drpo_megatron.models.layout import min_world_size

    return min_world_size(tp, pp, ep, etp)


def check_weights(hf_dir: str | os.PathLike, option: str = "--hf") -> None:
    """The weight files of an HF directory are complete: every file the index names exists and
    every ``*.safetensors`` header is intact and covered by the file (a truncated download or
    copy fails here, not as a traceback in the middle of the conversion)."""
    from safetensors import SafetensorError, safe_open

    d = Path(hf_dir).expanduser()
    files = sorted(d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ConvertError(f"{option} {str(hf_dir)!r}: {index.name} is not a valid index "
                               f"({e!r}); copy it again from the original checkpoint") from None
        missing = sorted(f for f in named if not (d / f).is_file())
        if missing:
            raise ConvertError(f"{option} {str(hf_dir)!r}: {index.name} names {missing[:3]} "
                               f"({len(missing)} missing) but they are not in the directory; copy "
                               "the complete checkpoint")
    if not files and not list(d.glob("*.bin")):
        raise ConvertError(f"{option} {str(hf_dir)!r}: no *.safetensors (or *.bin) weight files; "
                           "pass the directory that holds the weights")
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{option} {str(hf_dir)!r}: {f.name} is damaged ({e}); it is "
                               "probably truncated (an interrupted download or copy): copy it "
                               "again") from None


def _dtype_of(cfg: dict, requested: str | None) -> str:
    if requested:
        if requested not in ("fp32", "bf16"):
            raise ConvertError(f"--dtype={requested!r}: choose fp32 or bf16")
        return requested
    d = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return "bf16" if "bfloat16" in d else "fp32"


# ------------------------------------------------------------------- the output directory


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def staging_root(out: Path) -> Path:
    """``OUT.converting``: where a conversion is written and verified before it becomes OUT."""
    return out.with_name(out.name + STAGING_SUFFIX)


def check_output(out_dir: str | os.PathLike, sources: dict[str, str | None], *,
                 force: bool = False) -> Path:
    """The resolved ``--out`` after the checks that keep existing data (module doc): never a
    source directory, inside one or containing one; an existing non-empty directory only with
    ``force``; ``OUT.converting`` only when a previous ``drpo convert`` left it."""
    out = _resolved(out_dir)
    for opt, src in sources.items():
        if not src:
            continue
        s = _resolved(src)
        if _within(out, s):
            how = "is the same directory as" if out == s else "is inside"
            raise ConvertError(f"--out {str(out_dir)!r} {how} {opt} {str(src)!r}: the conversion "
                               "would overwrite its own source; pass a new directory outside it")
        if _within(s, out):
            raise ConvertError(f"--out {str(out_dir)!r} contains {opt} {str(src)!r}: replacing it "
                               "would delete the source; pass a directory that does not contain it")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConvertError(f"--out {str(out_dir)!r} exists and is not a directory; pass a new "
                               "directory path")
        if any(out.iterdir()) and not force:
            raise ConvertError(f"--out {str(out_dir)!r} exists and is not empty; pass a new "
                               "directory, or add --force to replace it (the old one stays until "
                               "the new one is complete and verified)")
    root = staging_root(out)
    if root.exists() and not (root / STAGING_MARKER).is_file():
        raise ConvertError(f"--out {str(out_dir)!r}: {root} exists and was not made by drpo "
                           "convert (its staging area); move it away or pass another --out")
    return out


def _launch_rank() -> int:
    """This process's rank before the process group exists (torchrun's RANK; 0 alone)."""
    return int(os.environ.get("RANK", "0"))


def _checked_output(out_dir, sources, force: bool) -> Path:
    """:func:`check_output` on rank 0 (it owns the staging area: another rank could see it
    half-removed); the resolved path elsewhere."""
    return check_output(out_dir, sources, force=force) if _launch_rank() == 0 else _resolved(out_dir)


def _begin_staging(out: Path) -> Path:
    """(rank 0) A fresh ``OUT.converting/`` with its marker; returns ``OUT.converting/new``."""
    root = staging_root(out)
    if root.exists():  # a previous conversion's (check_output saw the marker)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / STAGING_MARKER).write_text("drpo convert staging area; safe to delete\n")
    return root / "new"


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the filesystem does not offer it."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(new: Path, out: Path) -> None:
    """(rank 0) Put the verified ``new`` in place of ``out``: a plain rename when ``out`` does
    not exist, else an atomic exchange (two renames as the fallback); the old one is deleted
    only afterwards, with the staging area."""
    root = new.parent
    if out.exists():
        if not exchange_paths(new, out):
            os.rename(out, root / "old")
            os.rename(new, out)
    else:
        os.rename(new, out)
    shutil.rmtree(root)


# ------------------------------------------------------------------------------- helpers


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _say(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != META_FILE:
            shutil.copy2(f, dst / f.name)


def _set_config_dtype(hf_dir: Path, dtype: str) -> None:
    """config.json says the dtype the safetensors hold (``torch_dtype`` / ``dtype``)."""
    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    f = hf_dir / "config.json"
    c = json.loads(f.read_text())
    for d in (c, c.get("text_config")):
        if isinstance(d, dict):
            keys = [k for k in ("dtype", "torch_dtype") if k in d] or (["torch_dtype"] if d is c else [])
            for k in keys:
                d[k] = name
    f.write_text(json.dumps(c, indent=2))


def sample_input_ids(hf_dir: str | os.PathLike, vocab_size: int, *, max_len: int = 32):
    """[B, S] token ids: the tokenized SAMPLE_PROMPTS when the checkpoint has a tokenizer
    (truncated to a common length), else 4 seeded random sequences of 16 tokens."""
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p in SAMPLE_PROMPTS]
        n = min(max_len, *(len(r) for r in rows))
        if n >= 4:
            return torch.tensor([r[:n] for r in rows], dtype=torch.long)
    except Exception:  # no tokenizer files: fall through to random ids
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (4, 16), generator=g)


def reference_logits(hf_dir: str | os.PathLike, ids, dtype: str) -> dict:
    """transformers' logits [B, S, V] of the HF checkpoint (eager attention): ``"fp32"`` the
    reference (fp32 compute; a bf16 checkpoint's weights are exact in fp32), and for
    ``dtype="bf16"`` also ``"bf16"``: the same model cast to bf16, whose distance to the
    reference is the bf16 noise floor.  One model load (cast in place)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    out = {}
    with torch.no_grad():
        out["fp32"] = model(input_ids=ids).logits.float()
        if dtype == "bf16":
            model.to(torch.bfloat16)
            out["bf16"] = model(input_ids=ids).logits.float()
    del model
    return out


def megatron_logits(model_chunks: Sequence[Any], ids):
    """Full-vocab logits [B, S, V_padded] of a Megatron model (any TP/PP/EP), fp32, on every
    rank (forward-only pipeline schedule; last stage gathers over TP, then a broadcast)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from drpo_megatron.models import megatron_model as mm

    B, S = ids.shape
    pos = torch.arange(S).expand(B, S)
    mask = mm.causal_attention_mask(S)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is not None:
        ids, pos, mask = ids.to(device), pos.to(device), mask.to(device)
    store: list = []

    def forward_step(it, chunk):
        x = next(it)
        out = chunk(x, pos, mask)

        def loss_func(o):
            store.append(o.detach())
            return o.float().sum() * 0.0, {}

        return out, loss_func

    for m in model_chunks:
        m.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=list(model_chunks),
            num_microbatches=1, seq_length=S, micro_batch_size=B, forward_only=True)
    V = mm.vocab_size(model_chunks)
    full = torch.zeros(B, S, V, dtype=torch.float32, device=ids.device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        shard = store[0].float()
        tp = ps.get_tensor_model_parallel_world_size()
        full = gather_from_tensor_model_parallel_region(shard) if tp > 1 else shard
        full = full.contiguous()
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(full, src=last, group=ps.get_pipeline_model_parallel_group())
    return full.cpu()


def check_logits(got, ref: dict, dtype: str, atol: float | None = None) -> dict:
    """The verification verdict of Megatron logits ``got`` against :func:`reference_logits`
    (module doc: fp32 max-abs bound; bf16 RMS bound relative to the bf16 noise floor).  Logits
    are compared on the HF vocabulary (Megatron pads it)."""
    r32 = ref["fp32"]
    V = min(got.shape[-1], r32.shape[-1])
    a, r = got[..., :V].float(), r32[..., :V].float()
    d = a - r
    v: dict = {"max_abs_diff": float(d.abs().max()), "mean_abs_diff": float(d.abs().mean()),
               "rms_diff": float(d.pow(2).mean().sqrt()),
               "argmax_agreement": float((a.argmax(-1) == r.argmax(-1)).float().mean()),
               "shape": list(a.shape), "dtype": dtype}
    if dtype == "fp32":
        bound = DEFAULT_ATOL_FP32 if atol is None else atol
        v["atol"] = bound
        v["ok"] = v["max_abs_diff"] <= bound
        v["criterion"] = f"max |diff| <= atol {bound:g}"
        return v
    floor = float((ref["bf16"][..., :V].float() - r).pow(2).mean().sqrt())
    v["bf16_noise_rms"] = floor
    v["noise_ratio"] = v["rms_diff"] / floor if floor > 0 else (0.0 if v["rms_diff"] == 0 else float("inf"))
    v["noise_factor"] = BF16_NOISE_FACTOR
    v["ok"] = v["rms_diff"] <= BF16_NOISE_FACTOR * floor
    v["criterion"] = (f"rms diff {v['rms_diff']:.3e} = {v['noise_ratio']:.2f} x transformers' bf16 "
                      f"noise {floor:.3e} <= {BF16_NOISE_FACTOR:g} x")
    if atol is not None:
        v["atol"] = atol
        v["ok"] = v["ok"] and v["max_abs_diff"] <= atol
        v["criterion"] += f"; max |diff| <= atol {atol:g}"
    return v


def _verify(model, ids, ref_dir: str | os.PathLike, dtype: str, atol: float | None,
            against: str) -> dict | None:
    """Collective Megatron forward; the reference and the verdict on rank 0 (None elsewhere)."""
    got = megatron_logits(model, ids)
    if _rank() != 0:
        return None
    v = check_logits(got, reference_logits(ref_dir, ids, dtype), dtype, atol)
    v["against"] = against
    return v


def _load_model(hf_config_dir: str, *, dtype: str, tp: int, pp: int, ep: int, etp: int | None,
                load_weights: bool):
    from drpo_megatron.models import megatron_model as mm

    return mm.load_policy_from_hf(hf_config_dir, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                  wrap_ddp=False, load_weights=load_weights)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _finish(report: dict, new: Path, out: Path, *, meta_dir: Path | None) -> dict:
    """(collective) Write the report, publish ``new`` as ``out`` when verification passed (or
    was skipped), else leave it in the staging area."""
    v = report.get("verify")
    ok = True if v is None else bool(v["ok"])
    if _rank() == 0:
        report["published"] = ok
        report["out"] = str(out if ok else new)
        if meta_dir is not None:
            (meta_dir / META_FILE).write_text(json.dumps(report, indent=1))
        if ok:
            publish(new, out)
    barrier()
    return report


# ---------------------------------------------------------------------------- conversions


def hf_to_mcore(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None, dtype: str | None = None, verify: bool = True,
                atol: float | None = None, force: bool = False) -> dict:
    """HF -> Megatron torch_dist checkpoint (collective).  Returns the report dict (with
    ``verify`` on rank 0).  ``out_dir`` appears only complete and verified (module doc)."""
    import torch


    cfg = read_hf_config(hf_dir, "--hf")
    arch = check_architecture(cfg, "--hf")
    check_layout(cfg, tp, pp, ep, etp)
    check_weights(hf_dir, "--hf")
    dtype = _dtype_of(cfg, dtype)
    out = _checked_output(out_dir, {"--hf": hf_dir}, force)
    new = staging_root(out) / "new"
    if _launch_rank() == 0:
        _begin_staging(out)
    bridge, provider, model = _load_model(hf_dir, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                          load_weights=True)
    barrier()  # the staging area exists before any rank writes into it
    ckpt.save_megatron_checkpoint(model, None, new, step=0)
    if _rank() == 0:
        _copy_non_weight_files(Path(hf_dir).expanduser(), new / HF_CONFIG_SUBDIR)
    report: dict = {"direction": "hf-to-mcore", "source_hf": str(_resolved(hf_dir)),
                    "out": str(out), "architecture": arch, "tp": tp, "pp": pp, "ep": ep,
                    "etp": etp, "dtype": dtype, "world_size": _world()}
    if verify:
        # verify the artefact, not the in-memory model: zero every parameter, reload, compare
        with torch.no_grad():
            for m in model:
                for p in m.parameters():
                    p.zero_()
        ckpt.load_megatron_checkpoint(model, None, new)
        ids = sample_input_ids(hf_dir, cfg["vocab_size"])
        v = _verify(model, ids, hf_dir, dtype, atol, "transformers (fp32) logits of --hf")
        if v is not None:
            report["verify"] = v
    return _finish(report, new, out, meta_dir=new if _rank() == 0 else None)


def mcore_to_hf(mcore_dir: str, out_dir: str, *, hf_config: str | None = None, tp: int = 1,
                pp: int = 1, ep: int = 1, etp: int | None = None, dtype: str | None = None,
                verify: bool = True, atol: float | None = None, force: bool = False) -> dict:
    """Megatron torch_dist checkpoint -> HF directory (collective).  Returns the report dict.
    With tied embeddings no ``lm_head.weight`` is written; config.json's dtype is the written
    one."""
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.weights.hf_export import write_hf_checkpoint

    mdir, meta, hf_config = _mcore_source(mcore_dir, hf_config)
    cfg = read_hf_config(hf_config, "--hf-config")
    arch = check_architecture(cfg, "--hf-config")
    check_layout(cfg, tp, pp, ep, etp)
    dtype = _dtype_of(cfg, dtype or meta.get("dtype"))
    out = _checked_output(out_dir, {"--mcore": mcore_dir, "--hf-config": hf_config}, force)
    new = staging_root(out) / "new"
    if _launch_rank() == 0:
        _begin_staging(out)
    bridge, provider, model = _load_model(hf_config, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                          load_weights=False)
    ckpt.load_megatron_checkpoint(model, None, mdir)
    # A config-only bridge: the HF directory may hold no weights (hf_config/ has none); the
    # export then maps every Megatron tensor without filtering against on-disk HF keys.
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(hf_config)
    bridge = AutoBridge.from_hf_config(hf_cfg)
    tied = bool(getattr(hf_cfg.get_text_config(), "tie_word_embeddings", False))
    named = mm.export_hf_state_dict(bridge, model)
    if tied:  # the LM head is the embedding: HF ties it on load, a copy would only add bytes
        named = ((k, t) for k, t in named if k != "lm_head.weight")
    write_hf_checkpoint(named, new, source_dir=hf_config, precision="bf16", write=_rank() == 0)
    if _rank() == 0:
        _set_config_dtype(new, dtype)
    barrier()
    report: dict = {"direction": "mcore-to-hf", "mcore": str(mdir.resolve()), "hf_config": hf_config,
                    "out": str(out), "architecture": arch, "tp": tp, "pp": pp, "ep": ep,
                    "etp": etp, "dtype": dtype, "world_size": _world(), "tied_embeddings": tied}
    if verify:
        ids = sample_input_ids(hf_config, cfg["vocab_size"])
        v = _verify(model, ids, new, dtype, atol,
                    "transformers (fp32) logits of the written HF checkpoint")
        if v is not None:
            report["verify"] = v
    return _finish(report, new, out, meta_dir=None)


def verify_mcore(mcore_dir: str, hf_dir: str, *, hf_config: str | None = None, tp: int = 1,
                 pp: int = 1, ep: int = 1, etp: int | None = None, dtype: str | None = None,
                 atol: float | None = None) -> dict:
    """The logits check of an existing Megatron checkpoint against an HF checkpoint (collective;
    the verdict on rank 0).  Writes nothing."""

    mdir, meta, hf_config = _mcore_source(mcore_dir, hf_config)
    cfg = read_hf_config(hf_config, "--hf-config")
    arch = check_architecture(cfg, "--hf-config")
    check_layout(cfg, tp, pp, ep, etp)
    read_hf_config(hf_dir, "--hf")
    check_weights(hf_dir, "--hf")
    dtype = _dtype_of(cfg, dtype or meta.get("dtype"))
    bridge, provider, model = _load_model(hf_config, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                          load_weights=False)
    ckpt.load_megatron_checkpoint(model, None, mdir)
    report: dict = {"direction": "verify", "mcore": str(mdir.resolve()), "hf": str(_resolved(hf_dir)),
                    "out": str(mdir.resolve()), "architecture": arch, "tp": tp, "pp": pp, "ep": ep,
                    "etp": etp, "dtype": dtype, "world_size": _world()}
    v = _verify(model, sample_input_ids(hf_dir, cfg["vocab_size"]), hf_dir, dtype, atol,
                "transformers (fp32) logits of --hf")
    if v is not None:
        report["verify"] = v
    barrier()
    return report


def _mcore_source(mcore_dir: str, hf_config: str | None) -> tuple[Path, dict, str]:
    """(checkpoint dir, its drpo_convert.json or {}, the HF config dir to build the model from)."""
    mdir = Path(mcore_dir).expanduser()
    if not mdir.is_dir():
        raise ConvertError(f"--mcore {mcore_dir!r}: directory not found; pass the --out "
                           "directory of `drpo convert hf-to-mcore`")
    if hf_config is None:
        if not (mdir / HF_CONFIG_SUBDIR / "config.json").is_file():
            raise ConvertError(f"--hf-config: not given and {mdir / HF_CONFIG_SUBDIR} has no "
                               "config.json; pass the HF directory whose config.json describes "
                               "this model")
        hf_config = str(mdir / HF_CONFIG_SUBDIR)
    if not (mdir / "metadata.json").is_file():
        raise ConvertError(f"--mcore {mcore_dir!r}: not a torch_dist checkpoint (no metadata.json); "
                           "pass the --out directory of `drpo convert hf-to-mcore` or a "
                           "save_megatron_checkpoint directory")
    meta = {}
    if (mdir / META_FILE).is_file():
        try:
            meta = json.loads((mdir / META_FILE).read_text())
        except json.JSONDecodeError:
            meta = {}
    return mdir, meta, hf_config


# ----------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drpo convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    for name, helptext in (("hf-to-mcore", "HF directory -> Megatron torch_dist checkpoint"),
                           ("mcore-to-hf", "Megatron torch_dist checkpoint -> HF directory"),
                           ("verify", "logits check of a Megatron checkpoint against an HF one")):
        s = sub.add_parser(name, help=helptext)
        if name != "mcore-to-hf":
            s.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
        if name != "hf-to-mcore":
            s.add_argument("--mcore", required=True, help="torch_dist checkpoint directory")
            s.add_argument("--hf-config", default=None,
                           help="directory with the HF config.json (default: MCORE/hf_config)")
        if name != "verify":
            s.add_argument("--out", required=True,
                           help="output directory: new or empty (an existing one needs --force)")
            s.add_argument("--force", action="store_true",
                           help="replace an existing --out (kept until the new one is verified)")
            s.add_argument("--no-verify", action="store_true", help="skip the logits check")
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--pp", type=int, default=1)
        s.add_argument("--ep", type=int, default=1)
        s.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")
        s.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="default: the checkpoint's dtype (bf16 if config says bfloat16)")
        s.add_argument("--atol", type=float, default=None,
                       help=f"max |logit diff| accepted (fp32 default {DEFAULT_ATOL_FP32:g}; with "
                            "bf16 an extra bound on top of the noise-relative check)")
        s.add_argument("--no-spawn", action="store_true",
                       help="never re-launch under torchrun (fail if the world is too small)")
        s.add_argument("--report", default=None, help="also write the report JSON here")
    return p


def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _spawn(argv: list[str], nproc: int) -> int:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "drpo_megatron.cli", "convert", *argv]
    print(f"drpo convert: {nproc} ranks needed; launching: {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def _precheck(args) -> None:
    """Everything that can be refused before a process starts or a model loads."""
    if args.direction == "hf-to-mcore":
        cfg_dir, opt = args.hf, "--hf"
    else:
        if not Path(args.mcore).expanduser().is_dir():
            raise ConvertError(f"--mcore {args.mcore!r}: directory not found; pass the --out "
                               "directory of `drpo convert hf-to-mcore`")
        _, _, cfg_dir = _mcore_source(args.mcore, args.hf_config)
        opt = "--hf-config"
    cfg = read_hf_config(cfg_dir, opt)
    check_architecture(cfg, opt)
    check_layout(cfg, args.tp, args.pp, args.ep, args.etp)
    if args.direction in ("hf-to-mcore", "verify"):
        read_hf_config(args.hf, "--hf")
        check_weights(args.hf, "--hf")
    if args.direction == "hf-to-mcore":
        _checked_output(args.out, {"--hf": args.hf}, args.force)
    elif args.direction == "mcore-to-hf":
        _checked_output(args.out, {"--mcore": args.mcore, "--hf-config": cfg_dir}, args.force)
    if args.atol is not None and not args.atol == args.atol:  # NaN would turn the check off
        raise ConvertError("--atol=nan: pass a number (or leave it out for the default)")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        _precheck(args)
        nproc = world_size_for(args.tp, args.pp, args.ep, args.etp)
        if not _under_launcher():
            if nproc > 1:
                if args.no_spawn:
                    raise ConvertError(f"--tp/--pp/--ep need {nproc} ranks; run under `torchrun "
                                       f"--nproc-per-node {nproc} -m drpo_megatron.cli convert ...` "
                                       "or drop --no-spawn")
                return _spawn(argv, nproc)
        else:
            world = int(os.environ["WORLD_SIZE"])
            if world % nproc:
                raise ConvertError(f"WORLD_SIZE={world}: not a multiple of pp*lcm(tp, ep*etp)="
                                   f"{nproc}; launch with --nproc-per-node {nproc}")
    except ConvertError as e:
        print(f"drpo convert: error: {e}", file=sys.stderr)
        return 2

    from drpo_megatron.models import megatron_model as mm

    common = dict(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, dtype=args.dtype,
                  atol=args.atol)
    try:
        if args.direction == "hf-to-mcore":
            report = hf_to_mcore(args.hf, args.out, verify=not args.no_verify, force=args.force,
                                 **common)
        elif args.direction == "mcore-to-hf":
            report = mcore_to_hf(args.mcore, args.out, hf_config=args.hf_config,
                                 verify=not args.no_verify, force=args.force, **common)
        else:
            report = verify_mcore(args.mcore, args.hf, hf_config=args.hf_config, **common)
    except ConvertError as e:
        print(f"drpo convert: error: {e}", file=sys.stderr)
        mm.destroy_distributed()
        return 2
    ok = True
    if _rank() == 0:
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
        v = report.get("verify")
        if report["direction"] == "verify":
            print(f"drpo convert verify: {report['mcore']} against {report['hf']} "
                  f"({report['architecture']}, {report['dtype']}, {report['world_size']} ranks)")
        elif report.get("published", True):
            print(f"drpo convert {report['direction']}: wrote {report['out']} ({report['architecture']}, "
                  f"tp={args.tp} pp={args.pp} ep={args.ep}, {report['dtype']}, {report['world_size']} ranks)")
        if v:
            ok = v["ok"]
            print(f"verify: max |logit diff| = {v['max_abs_diff']:.3e} (mean {v['mean_abs_diff']:.3e}, "
                  f"rms {v['rms_diff']:.3e}, argmax agreement {v['argmax_agreement']:.3f}) on "
                  f"{v['shape'][0]} sample prompts x {v['shape'][1]} tokens vs {v['against']}: "
                  f"{'OK' if ok else 'FAILED'} ({v['criterion']})")
            if not ok and report["direction"] != "verify":
                print(f"drpo convert: verification FAILED: the output was not put in place; the "
                      f"unverified result is in {report['out']} (--out left as it was)",
                      file=sys.stderr)
    mm.destroy_distributed()
    return 0 if ok else 1
