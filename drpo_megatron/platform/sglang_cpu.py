"""What an SGLang 0.5.23 server needs to run on a CPU-only machine (no-op with CUDA).

Fixes (each pinned by a test in ``tests/platform/test_sglang_cpu.py`` showing it is still needed):

1. ``torchvision_op_schemas`` (:mod:`drpo_megatron.platform.torchvision_ops`): torchvision's
   compiled ops do not load against the CPU torch wheel; SGLang imports it via transformers.
2. ``sgl_kernel`` stand-in (``sglang_site/sgl_kernel``): see that module.  It also provides the
   one kernel seeded sampling calls on CPU, ``murmur_hash32_cpu`` (our torch implementation).
3. ``honour_sampling_seeds``: SGLang 0.5.23 uses a request's ``sampling_seed`` only under
   ``--enable-deterministic-inference``, which rejects the ``torch_native`` attention backend and
   installs Triton batch-invariant matmuls: on CPU the flag cannot start a server, so seeds were
   silently ignored and every sample came from the server's global RNG (whose state depends on
   everything the server sampled before: a restarted server, e.g. after a resume, drew different
   samples).  The fix fills ``SamplingBatchInfo.sampling_seed`` from the requests, so SGLang's own
   seeded Gumbel sampler (``multinomial_with_seed``) runs; requests without a seed get one drawn
   from the server's RNG (same distribution as before).  min-p sampling is not supported with
   seeds by SGLang (it asserts); drpo never sends min_p.
4. ``unpinned_cpu_host_buffers``: ``--enable-return-routed-experts`` (routing replay, R3) keeps
   every token's routed experts in a host buffer allocated through
   ``pool_host.common.ALLOC_MEMORY_FUNCS[device]``; for ``device="cpu"`` that is
   ``alloc_with_host_register``, which pins it with ``cudaHostRegister`` and fails without CUDA
   ("Torch not compiled with CUDA enabled"): the server dies at start-up.  The fix allocates
   plain (unpinned) host memory for the cpu device, which is all a CPU server needs.

Server flags that keep SGLang on pure-torch paths are in :data:`CPU_SERVER_ARGS`, its environment
in :data:`CPU_SERVER_ENV`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from drpo_megatron.platform.torchvision_ops import define_torchvision_op_schemas  # noqa: F401

SITE_DIR = Path(__file__).resolve().parent / "sglang_site"

# Flags that keep SGLang 0.5.23 on code paths that exist without CUDA kernels.
CPU_SERVER_ARGS: tuple[str, ...] = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    # On CPU SGLang budgets the KV pool from *system* free memory: pool = free-after-load -
    # (1 - f) * free-before-load, so any memory another process (the trainer building its model,
    # a second server) takes while this one loads is charged to it. f = 0.05 failed at start-up
    # on a busy machine ("Loaded weights leave no GPU memory for the KV cache"); f = 0.3 leaves
    # a wide margin, and --max-total-tokens caps what the pool really allocates.
    "--mem-fraction-static", "0.3",
    "--max-total-tokens", "131072",
)

CPU_SERVER_ENV: dict[str, str] = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # SGLang wraps its seeded sampler in torch.compile; on CPU inductor compiles it with g++ at
    # the first sampled token (~30 s on a 2-core machine).  Eager runs the same torch ops.
    "TORCHDYNAMO_DISABLE": "1",
}

SAMPLING_BATCH_INFO_MODULE = "sglang.srt.sampling.sampling_batch_info"
HOST_POOL_MODULE = "sglang.srt.mem_cache.pool_host.common"


def honour_sampling_seeds(module) -> None:
    """Patch ``SamplingBatchInfo.from_schedule_batch`` (in ``module``, SGLang's
    sampling_batch_info) so every batch carries per-request seeds (fix 3 of the module doc)."""
    cls = module.SamplingBatchInfo
    original = cls.from_schedule_batch.__func__
    if getattr(original, "_drpo_seeded", False):
        return

    def from_schedule_batch(klass, batch, vocab_size):
        info = original(klass, batch, vocab_size)
        if info.sampling_seed is None:
            seeds = []
            for r in batch.reqs:
                sp = r.sampling_params
                if sp.sampling_seed is None:  # drawn once per request: stable across its decode
                    sp.sampling_seed = int(torch.randint(0, 2**31 - 1, ()).item())
                seeds.append(sp.sampling_seed)
            info.sampling_seed = torch.tensor(seeds, dtype=torch.int64,
                                              device=info.temperatures.device)
        return info

    from_schedule_batch._drpo_seeded = True
    cls.from_schedule_batch = classmethod(from_schedule_batch)


def unpinned_cpu_host_buffers(module) -> None:
    """Patch ``ALLOC_MEMORY_FUNCS`` (in ``module``, SGLang's pool_host.common) so host buffers of
    the cpu device are allocated without CUDA pinning (fix 4 of the module doc)."""
    funcs = module.ALLOC_MEMORY_FUNCS
    if getattr(funcs.get("cpu"), "_drpo_unpinned", False):
        return

    def alloc_unpinned(dims, dtype, device, pin_memory, allocator,
                       registration_granularity_bytes=None):
        del pin_memory, registration_granularity_bytes  # nothing to pin without CUDA
        if allocator is None:
            return torch.empty(dims, dtype=dtype, device=device)
        return allocator.allocate(dims, dtype=dtype, device=device)

    alloc_unpinned._drpo_unpinned = True
    funcs["cpu"] = alloc_unpinned


def after_import(module_name: str, hook) -> None:
    """Run ``hook(module)`` once ``module_name`` has been imported (now, if it already is)."""
    import importlib.abc
    import importlib.util
    import sys

    if module_name in sys.modules:
        hook(sys.modules[module_name])
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != module_name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_hook(mod):
                exec_module(mod)
                hook(mod)

            spec.loader.exec_module = exec_and_hook
            return spec

    sys.meta_path.insert(0, _Finder())



def needs_cpu_compat() -> bool:
    return not torch.cuda.is_available()


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang server subprocess: on CPU adds the site folder (sgl_kernel
    stand-in + sitecustomize) in front of ``PYTHONPATH`` and the CPU engine variables."""
    env = dict(os.environ if base is None else base)
    if needs_cpu_compat():
        parts = [str(SITE_DIR), str(SITE_DIR.parents[2])]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env.update(CPU_SERVER_ENV)
    return env


def server_args() -> list[str]:
    return list(CPU_SERVER_ARGS) if needs_cpu_compat() else []
