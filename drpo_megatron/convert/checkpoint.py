"""Offline HF <-> Megatron-Core checkpoint conversion through megatron-bridge, with verification.

``drpo convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N] [--dtype fp32|bf16]``
    Loads the HF checkpoint into a Megatron-Core GPTModel sharded TP x PP x EP (megatron-bridge
    maps the names), saves it with ``dist_checkpointing`` (torch_dist; the format of
    :func:`drpo_megatron.training.checkpoint.save_megatron_checkpoint`, which loads under any
    other TP/PP/EP layout), then **zeroes every parameter, reloads the saved checkpoint** and
    prints the max |logit difference| against the HF model (transformers) on sample prompts.

``drpo convert mcore-to-hf --mcore DIR --hf-config DIR --out DIR [--tp N --pp N --ep N]``
    Builds the model skeleton from ``--hf-config`` (a directory with config.json; the
    ``hf_config/`` copy that ``hf-to-mcore`` writes into its output is the default), loads the
    Megatron checkpoint (resharding to the requested layout), writes an HF checkpoint
    (safetensors + index + config + tokenizer files) and prints the max |logit difference|
    between the written HF model (re-read by transformers) and the Megatron model.

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
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from drpo_megatron.dist import barrier, free_port
from drpo_megatron.errors import InputError

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
# Default verification bounds on max |logit diff|: fp32 (measured ~2e-7 on the tiny models) and
# bf16 (a sanity bound: a mis-mapped tensor moves logits by O(1)).
DEFAULT_ATOL = {"fp32": 1e-4, "bf16": 0.5}
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
        raise ConvertError(f"{option} {str(hf_dir)!r}: config.json is not valid JSON ({e})") from e


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
    """Divisibility the Megatron model needs (one-line errors naming the option)."""
    for name, v in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp or 1)):
        if v < 1:
            raise ConvertError(f"{name}={v}: must be >= 1")
    heads = cfg.get("num_attention_heads", 0)
    kv = cfg.get("num_key_value_heads", heads) or heads
    layers = cfg.get("num_hidden_layers", 0)
    experts = cfg.get("num_experts", 0) or cfg.get("num_local_experts", 0) or 0
    if heads % tp:
        raise ConvertError(f"--tp={tp}: num_attention_heads={heads} is not divisible by it; "
                           f"pick a divisor of {heads}")
    if kv % tp:
        raise ConvertError(f"--tp={tp}: num_key_value_heads={kv} is not divisible by it (Megatron "
                           f"splits KV groups over TP); pick a divisor of {kv}")
    if layers % pp:
        raise ConvertError(f"--pp={pp}: num_hidden_layers={layers} is not divisible by it; pick a "
                           f"divisor of {layers}")
    if ep > 1 and not experts:
        raise ConvertError(f"--ep={ep}: the model has no experts (dense); use --ep 1")
    if experts and experts % ep:
        raise ConvertError(f"--ep={ep}: num_experts={experts} is not divisible by it; pick a "
                           f"divisor of {experts}")


def world_size_for(tp: int, pp: int, ep: int, etp: int | None) -> int:
    """Smallest world Megatron accepts: divisible by tp*pp and by pp*ep*etp."""
    etp = tp if etp is None else etp
    return pp * math.lcm(tp, ep * etp)


def _dtype_of(cfg: dict, requested: str | None) -> str:
    if requested:
        if requested not in ("fp32", "bf16"):
            raise ConvertError(f"--dtype={requested!r}: choose fp32 or bf16")
        return requested
    d = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return "bf16" if "bfloat16" in d else "fp32"


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


def hf_logits(hf_dir: str | os.PathLike, ids, dtype: str):
    """Logits [B, S, V] of the HF model (transformers, eager attention) in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    td = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=td, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
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
        full = gather_from_tensor_model_parallel_region(shard) if ps.get_tensor_model_parallel_world_size() > 1 else shard
        full = full.contiguous()
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(full, src=last, group=ps.get_pipeline_model_parallel_group())
    return full.cpu()


def _compare(a, b) -> dict:

    V = min(a.shape[-1], b.shape[-1])  # Megatron pads the vocab
    a, b = a[..., :V].float(), b[..., :V].float()
    d = (a - b).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "shape": list(a.shape)}


def _load_model(hf_config_dir: str, *, dtype: str, tp: int, pp: int, ep: int, etp: int | None,
                load_weights: bool):
    from drpo_megatron.models import megatron_model as mm

    return mm.load_policy_from_hf(hf_config_dir, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                  wrap_ddp=False, load_weights=load_weights)


# ---------------------------------------------------------------------------- conversions


def hf_to_mcore(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None, dtype: str | None = None, verify: bool = True,
                atol: float | None = None) -> dict:
    """HF -> Megatron torch_dist checkpoint (collective).  Returns the report dict."""
    import torch

    from drpo_megatron.training import checkpoint as ckpt

    cfg = read_hf_config(hf_dir, "--hf")
    arch = check_architecture(cfg, "--hf")
    check_layout(cfg, tp, pp, ep, etp)
    dtype = _dtype_of(cfg, dtype)
    out = Path(out_dir).expanduser().resolve()
    bridge, provider, model = _load_model(hf_dir, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                          load_weights=True)
    ckpt.save_megatron_checkpoint(model, None, out, step=0)
    if _rank() == 0:
        _copy_non_weight_files(Path(hf_dir).expanduser(), out / HF_CONFIG_SUBDIR)
    report: dict = {"direction": "hf-to-mcore", "source_hf": str(Path(hf_dir).expanduser().resolve()),
                    "out": str(out), "architecture": arch, "tp": tp, "pp": pp, "ep": ep,
                    "etp": etp, "dtype": dtype, "world_size": _world()}
    if verify:
        # verify the artefact, not the in-memory model: zero every parameter, reload, compare
        with torch.no_grad():
            for m in model:
                for p in m.parameters():
                    p.zero_()
        ckpt.load_megatron_checkpoint(model, None, out)
        ids = sample_input_ids(hf_dir, cfg["vocab_size"])
        ref = hf_logits(hf_dir, ids, dtype)
        got = megatron_logits(model, ids)
        report["verify"] = _compare(got, ref)
        report["verify"]["against"] = "HF (transformers) logits of --hf"
        _check_atol(report, dtype, atol)
    if _rank() == 0:
        (out / META_FILE).write_text(json.dumps(report, indent=1))
    barrier()
    return report


def mcore_to_hf(mcore_dir: str, out_dir: str, *, hf_config: str | None = None, tp: int = 1,
                pp: int = 1, ep: int = 1, etp: int | None = None, dtype: str | None = None,
                verify: bool = True, atol: float | None = None) -> dict:
    """Megatron torch_dist checkpoint -> HF directory (collective).  Returns the report dict."""
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training import checkpoint as ckpt
    from drpo_megatron.weights.hf_export import write_hf_checkpoint

    mdir = Path(mcore_dir).expanduser()
    if not (mdir / "metadata.json").is_file():
        raise ConvertError(f"--mcore {mcore_dir!r}: not a torch_dist checkpoint (no metadata.json); "
                           "pass the --out directory of `drpo convert hf-to-mcore` or a "
                           "save_megatron_checkpoint directory")
    meta = {}
    if (mdir / META_FILE).is_file():
        meta = json.loads((mdir / META_FILE).read_text())
    if hf_config is None:
        if not (mdir / HF_CONFIG_SUBDIR / "config.json").is_file():
            raise ConvertError(f"--hf-config: not given and {mdir / HF_CONFIG_SUBDIR} has no "
                               "config.json; pass the HF directory whose config.json describes "
                               "this model")
        hf_config = str(mdir / HF_CONFIG_SUBDIR)
    cfg = read_hf_config(hf_config, "--hf-config")
    arch = check_architecture(cfg, "--hf-config")
    check_layout(cfg, tp, pp, ep, etp)
    dtype = _dtype_of(cfg, dtype or meta.get("dtype"))
    out = Path(out_dir).expanduser().resolve()
    bridge, provider, model = _load_model(hf_config, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                          load_weights=False)
    ckpt.load_megatron_checkpoint(model, None, mdir)
    # A config-only bridge: the HF directory may hold no weights (hf_config/ has none); the
    # export then maps every Megatron tensor without filtering against on-disk HF keys.
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    bridge = AutoBridge.from_hf_config(AutoConfig.from_pretrained(hf_config))
    write_hf_checkpoint(mm.export_hf_state_dict(bridge, model), out, source_dir=hf_config,
                        precision="bf16", write=_rank() == 0)
    barrier()
    report: dict = {"direction": "mcore-to-hf", "mcore": str(mdir.resolve()), "hf_config": hf_config,
                    "out": str(out), "architecture": arch, "tp": tp, "pp": pp, "ep": ep,
                    "etp": etp, "dtype": dtype, "world_size": _world()}
    if verify:
        ids = sample_input_ids(hf_config, cfg["vocab_size"])
        got = megatron_logits(model, ids)
        ref = hf_logits(out, ids, dtype)
        report["verify"] = _compare(ref, got)
        report["verify"]["against"] = "Megatron logits of --mcore"
        _check_atol(report, dtype, atol)
    return report


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _check_atol(report: dict, dtype: str, atol: float | None) -> None:
    bound = DEFAULT_ATOL[dtype] if atol is None else atol
    v = report["verify"]
    v["atol"] = bound
    v["ok"] = v["max_abs_diff"] <= bound


# ----------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drpo convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    for name, helptext in (("hf-to-mcore", "HF directory -> Megatron torch_dist checkpoint"),
                           ("mcore-to-hf", "Megatron torch_dist checkpoint -> HF directory")):
        s = sub.add_parser(name, help=helptext)
        if name == "hf-to-mcore":
            s.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
        else:
            s.add_argument("--mcore", required=True, help="torch_dist checkpoint directory")
            s.add_argument("--hf-config", default=None,
                           help="directory with the HF config.json (default: MCORE/hf_config)")
        s.add_argument("--out", required=True, help="output directory (replaced)")
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--pp", type=int, default=1)
        s.add_argument("--ep", type=int, default=1)
        s.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")
        s.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="default: the checkpoint's dtype (bf16 if config says bfloat16)")
        s.add_argument("--no-verify", action="store_true", help="skip the logits check")
        s.add_argument("--atol", type=float, default=None,
                       help=f"max |logit diff| accepted (default {DEFAULT_ATOL})")
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        src_cfg_dir = args.hf if args.direction == "hf-to-mcore" else (
            args.hf_config or str(Path(args.mcore).expanduser() / HF_CONFIG_SUBDIR))
        opt = "--hf" if args.direction == "hf-to-mcore" else "--hf-config"
        if args.direction == "mcore-to-hf" and not Path(args.mcore).expanduser().is_dir():
            raise ConvertError(f"--mcore {args.mcore!r}: directory not found; pass the --out "
                               "directory of `drpo convert hf-to-mcore`")
        cfg = read_hf_config(src_cfg_dir, opt)
        check_architecture(cfg, opt)
        check_layout(cfg, args.tp, args.pp, args.ep, args.etp)
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
                  verify=not args.no_verify, atol=args.atol)
    try:
        if args.direction == "hf-to-mcore":
            report = hf_to_mcore(args.hf, args.out, **common)
        else:
            report = mcore_to_hf(args.mcore, args.out, hf_config=args.hf_config, **common)
    except ConvertError as e:
        print(f"drpo convert: error: {e}", file=sys.stderr)
        return 2
    finally:
        pass
    ok = True
    if _rank() == 0:
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
        v = report.get("verify")
        print(f"drpo convert {report['direction']}: wrote {report['out']} ({report['architecture']}, "
              f"tp={args.tp} pp={args.pp} ep={args.ep}, {report['dtype']}, {report['world_size']} ranks)")
        if v:
            ok = v["ok"]
            print(f"verify: max |logit diff| = {v['max_abs_diff']:.3e} (mean {v['mean_abs_diff']:.3e}, "
                  f"argmax agreement {v['argmax_agreement']:.3f}) on {v['shape'][0]} sample prompts x "
                  f"{v['shape'][1]} tokens vs {v['against']}: {'OK' if ok else 'FAILED'} "
                  f"(atol {v['atol']:g})")
    mm.destroy_distributed()
    return 0 if ok else 1
