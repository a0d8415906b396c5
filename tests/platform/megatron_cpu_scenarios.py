"""Upstream calls that fail on CPU without one of the CPU fixes (run as a script).

``python megatron_cpu_scenarios.py [--exclude FIX ...] SCENARIO ...`` applies every CPU fix
except the excluded ones, then runs the named scenarios in order; ``all`` runs every scenario.
``--batch OUT.json`` runs, each in a forked child of one parent that has imported Megatron-Core
unpatched, every "without fix X" job and the "all fixes" job, and writes rc + output per job.
Used by ``test_megatron_cpu.py``: with a fix excluded its scenario must fail with the error
recorded in :data:`EXPECTED_ERRORS` (else the fix is obsolete), and with all fixes applied
every scenario must pass.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

# fix name -> (scenario, substring of the upstream error without the fix, file of the
# innermost upstream frame that must appear in the traceback)
EXPECTED_ERRORS = {
    "typing_override": (
        "import_bridge", "cannot import name 'override' from 'typing'",
        "megatron/training/models/hybrid.py"),
    "torchvision_op_schemas": (
        "import_transformers_models", "operator torchvision::nms does not exist",
        "torchvision/_meta_registrations.py"),
    "transformer_engine_stub_for_bridge_lora": (
        "import_bridge", "No module named 'transformer_engine'",
        "megatron/bridge/peft/lora_layers.py"),
    "cuda_facade": (
        "build_moe_gpt", "Torch not compiled with CUDA enabled",
        "megatron/core/tensor_parallel/layers.py"),
    "cuda_device_redirect": (
        "pipeline_schedule", "Torch not compiled with CUDA enabled",
        "megatron/core/pipeline_parallel/schedules.py"),
    "recompute_device_redirect": (
        "recompute_moe_backward", "Cannot access accelerator device",
        "megatron/core/transformer/moe/router.py"),
    "cuda_tensor_type_checks": (
        "distributed_optimizer", "Wrapped parameters must be one of torch.cuda.FloatTensor",
        "megatron/core/optimizer/distrib_optimizer.py"),
    "cpu_rng_tracker": (
        "rng_seed", "Torch not compiled with CUDA enabled",
        "megatron/core/tensor_parallel/random.py"),
    # The real failure is all_to_all_single in MoEAlltoAllTokenDispatcher with EP > 1; the
    # scenario feeds the dispatcher's own maybe_move_tensor_to_cpu output to the same call.
    "moe_alltoall_split_sizes": (
        "alltoall_split_sizes", "all_to_all_single(): incompatible function arguments",
        "torch/distributed/distributed_c10d.py"),
    "distrib_optimizer_fresh_state_dict": (
        "distopt_checkpoint_roundtrip", "assert len(steps) == 1",
        "megatron/core/optimizer/distrib_optimizer.py"),
    "distrib_optimizer_load_torch_adam_step": (
        "distopt_checkpoint_roundtrip", "KeyError: 'step'",
        "megatron/core/optimizer/distrib_optimizer.py"),
    # No exception upstream: the scenario asserts what goes wrong (a shared step tensor).
    "distrib_optimizer_shared_step_after_load": (
        "distopt_checkpoint_roundtrip", "all params share one Adam step tensor after load",
        "megatron_cpu_scenarios.py"),
    "device_redirect_in_nested_backward": (
        "recompute_backward_alloc", "Cannot access accelerator device when none is available",
        "megatron/core/tensor_parallel/random.py"),
    "torch_norm_sequence_parallel": (
        "sequence_parallel_norm", "sequence parallel not supported by torch LayerNorm",
        "megatron/core/transformer/torch_norm.py"),
}


def _init_dist(seed: bool = True):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    if seed:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1)


def _tiny_config(**kw):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from drpo_megatron.platform import cpu_transformer_overrides

    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                  num_moe_experts=2, moe_router_topk=2, moe_ffn_hidden_size=32,
                  moe_token_dispatcher_type="alltoall", params_dtype=torch.float32)
    fields.update(cpu_transformer_overrides())
    fields.update(kw)
    return TransformerConfig(**fields)


def _tiny_gpt(**kw):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    cfg = _tiny_config(**kw)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    return GPTModel(cfg, spec, vocab_size=64, max_sequence_length=16, position_embedding_type="rope")


def import_bridge():
    import megatron.bridge  # noqa: F401


def import_transformers_models():
    import transformers.modeling_utils  # noqa: F401


def rng_seed():
    _init_dist(seed=True)


def build_moe_gpt():
    _init_dist()
    _tiny_gpt(use_cpu_initialization=False)


def pipeline_schedule():
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _init_dist()
    model = _tiny_gpt()
    ids = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1).view(1, 1, 8, 8)

    def step(it, m):
        next(it)
        out = m(ids, pos, mask)
        return out, lambda o: (o.float().mean(), {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=[model],
                                num_microbatches=1, seq_length=8, micro_batch_size=2,
                                forward_only=True)


def distributed_optimizer():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    _init_dist()
    model = _tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), [ddp])


def _ddp_distopt():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), [ddp])
    return model, ddp, opt


def distopt_checkpoint_roundtrip():
    """torch_dist save of model + DistributedOptimizer (fully_reshardable), load into new ones."""
    import tempfile

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import finalize_model_grads

    _init_dist()
    meta = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
    model, ddp, opt = _ddp_distopt()
    ids = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1).view(1, 1, 8, 8)
    ddp.zero_grad_buffer()
    ddp(ids, pos, mask).float().mean().backward()
    finalize_model_grads([ddp])
    opt.step()
    with tempfile.TemporaryDirectory() as d:
        sd = {"model": model.sharded_state_dict()}
        sd["optimizer"] = opt.sharded_state_dict(sd, metadata=meta)
        dist_checkpointing.save(sd, d)
        model2, ddp2, opt2 = _ddp_distopt()
        sd2 = {"model": model2.sharded_state_dict()}
        sd2["optimizer"] = opt2.sharded_state_dict(sd2, is_loading=True, metadata=meta)
        with torch.no_grad():
            loaded = dist_checkpointing.load(sd2, d)
            model2.load_state_dict(loaded["model"])
            opt2.load_state_dict(loaded["optimizer"])
    steps = [s["step"] for o in opt2.chained_optimizers for s in o.optimizer.state.values()]
    if len({id(t) for t in steps}) == 1 and len(steps) > 1:
        raise AssertionError("all params share one Adam step tensor after load")
    assert all(float(t) == 1.0 for t in steps), steps


def recompute_moe_backward():
    """Full activation recompute of a MoE layer: backward re-runs its forward."""
    import torch

    _init_dist()
    model = _tiny_gpt(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1).view(1, 1, 8, 8)
    model(ids, pos, mask, labels=ids).float().mean().backward()


def alltoall_split_sizes():
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe import token_dispatcher

    _init_dist(seed=False)
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    inp = torch.arange(3.0)
    out = torch.empty(3)
    dist.all_to_all_single(out, inp, output_split_sizes=splits, input_split_sizes=splits)


def sequence_parallel_norm():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = _tiny_config(tensor_model_parallel_size=2, sequence_parallel=True, normalization="RMSNorm")
    WrappedTorchNorm(cfg, 32)


def recompute_backward_alloc():
    """Megatron's activation checkpoint (parallel.recompute: full) under the schedules' backward:
    the recomputed graph's backward allocates on ``torch.cuda.current_device()``, as the
    sequence-parallel reduce-scatter does (tensor_parallel/mappings.py)."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel.schedules import custom_backward, deallocate_output_tensor

    _init_dist()

    class AllocInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            buf = torch.empty(g.shape, dtype=g.dtype, device=torch.cuda.current_device())
            return buf.copy_(g) * 2

    x = torch.ones(4, requires_grad=True)
    y = tensor_parallel.checkpoint(AllocInBackward.apply, False, x)
    grad = torch.ones_like(y)
    deallocate_output_tensor(y, True)  # what the schedules do before their backward
    custom_backward(y, grad)
    assert torch.equal(x.grad, torch.full((4,), 2.0)), x.grad


SCENARIOS = {f.__name__: f for f in (
    import_transformers_models, import_bridge, rng_seed, build_moe_gpt, pipeline_schedule,
    distributed_optimizer, distopt_checkpoint_roundtrip, alltoall_split_sizes,
    sequence_parallel_norm, recompute_moe_backward, recompute_backward_alloc)}


def _run_one(exclude, scenarios) -> int:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat(exclude=exclude)
    names = list(SCENARIOS) if scenarios == ["all"] else scenarios
    for name in names:
        SCENARIOS[name]()
        print(f"scenario {name}: ok", flush=True)
    return 0


def run_batch(out_json: str, parallel: int = 2, timeout: float = 240.0) -> int:
    """Every 'without fix X' job and the 'all fixes, all scenarios' job, each in a forked child.

    The parent imports the heavy, unpatched modules once (no fix applied in the parent), so
    each child starts in milliseconds instead of re-importing Megatron-Core; each child then
    applies its fixes and runs its scenario exactly as a fresh process would.
    """
    import json
    import signal
    import tempfile
    import time
    import traceback

    import torch  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.token_dispatcher  # noqa: F401
    import megatron.core.transformer.torch_norm  # noqa: F401

    jobs = [(fix, ["--exclude", fix, scenario]) for fix, (scenario, _, _) in EXPECTED_ERRORS.items()]
    jobs.append(("<all fixes>", ["all"]))
    results, running = {}, {}
    tmp = tempfile.mkdtemp(prefix="megatron_cpu_scenarios_")
    while jobs or running:
        while jobs and len(running) < parallel:
            name, argv = jobs.pop(0)
            path = os.path.join(tmp, f"job{len(results) + len(running)}.log")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    args = _parse(argv)
                    code = _run_one(args.exclude, args.scenarios)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = (name, path, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for cpid, (_name, _path, t0) in list(running.items()):
                if time.monotonic() - t0 > timeout:
                    os.kill(cpid, signal.SIGKILL)
            time.sleep(0.05)
            continue
        name, path, t0 = running.pop(pid)
        with open(path, errors="replace") as f:
            output = f.read()
        results[name] = {"rc": os.waitstatus_to_exitcode(status), "output": output[-500000:],
                         "seconds": round(time.monotonic() - t0, 2)}
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--batch", help="run every job in forked children, results to this JSON")
    parser.add_argument("scenarios", nargs="*")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.batch:
        return run_batch(args.batch)
    return _run_one(args.exclude, args.scenarios)


if __name__ == "__main__":
    sys.exit(main())
