"""Each SGLang CPU fix in drpo_megatron.platform.sglang_cpu is still needed (and still works).

If one of the "still needed" tests fails, upstream fixed the problem: delete the fix.
"""

import os
import subprocess
import sys

import pytest
import torch

from drpo_megatron.platform import sglang_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only compatibility layer")


def _run(code: str, env_extra: dict | None = None, pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=240)


def test_torchvision_import_still_needs_op_schemas():
    r = _run("import torchvision")
    assert r.returncode != 0 and "operator torchvision::nms does not exist" in r.stderr, (
        "torchvision imports without drpo's op schemas: remove define_torchvision_op_schemas")
    fixed = _run("from drpo_megatron.platform.sglang_cpu import define_torchvision_op_schemas as f\n"
                 "assert f()\nimport torchvision\nprint('ok')")
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_sglang_kv_cache_module_still_needs_sgl_kernel():
    mod = "import sglang.kernels.ops.kvcache.cache_move"
    env = dict(sglang_cpu.CPU_SERVER_ENV)
    pre = "from drpo_megatron.platform.sglang_cpu import define_torchvision_op_schemas as f; f()\n"
    r = _run(pre + mod, env)
    assert r.returncode != 0 and "No module named 'sgl_kernel'" in r.stderr, (
        "SGLang no longer needs sgl_kernel on CPU: remove sglang_site/sgl_kernel")
    site_env = sglang_cpu.server_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    fixed = _run(mod + "\nimport sgl_kernel\nassert sgl_kernel.STUB\nprint('ok')", env,
                 pythonpath=site_env["PYTHONPATH"])
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_sgl_kernel_stub_raises_when_called():
    sys.path.insert(0, str(sglang_cpu.SITE_DIR))
    try:
        import sgl_kernel

        with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu"):
            sgl_kernel.copy_all_layer_kv_cache_cpu(1, 2)
    finally:
        sys.path.remove(str(sglang_cpu.SITE_DIR))
        sys.modules.pop("sgl_kernel", None)


def test_server_env_and_args_on_cpu():
    env = sglang_cpu.server_env({"PYTHONPATH": "/x"})
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(sglang_cpu.SITE_DIR) and parts[-1] == "/x"
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    args = sglang_cpu.server_args()
    assert args[args.index("--device") + 1] == "cpu"


def _murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """Textbook MurmurHash3_x86_32 on a byte string (scalar python ints)."""
    c1, c2, m32 = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & m32  # noqa: E731
    h = seed
    for i in range(0, len(data) // 4 * 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = rotl((k * c1) & m32, 15) * c2 & m32
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & m32
    assert len(data) % 4 == 0
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m32
    return h ^ (h >> 16)


def test_sgl_kernel_stub_murmur_hash_matches_murmur3():
    """The stand-in's murmur_hash32_cpu = MurmurHash3_x86_32 of (seed as u64, position as u32,
    column as u32) little-endian, SGLang's definition, for seeds/positions/ids over full ranges."""
    import struct

    sys.path.insert(0, str(sglang_cpu.SITE_DIR))
    try:
        import sgl_kernel  # noqa: F401  (registers the op)

        g = torch.Generator().manual_seed(0)
        seeds = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**40 + 5]),
                           torch.randint(0, 2**62, (4,), generator=g)])
        pos = torch.cat([torch.tensor([0, 1, 7, 2**31 - 1]),
                         torch.randint(0, 2**31, (4,), generator=g)])
        cols = torch.cat([torch.tensor([0, 1, 151_935]), torch.randint(0, 2**31, (5,), generator=g)])
        got = torch.ops.sgl_kernel.murmur_hash32_cpu.default(seeds, pos, cols)
        assert got.dtype == torch.uint32 and got.shape == (8, 8)
        for i in range(8):
            for j in range(8):
                data = struct.pack("<QII", int(seeds[i]), int(pos[i]), int(cols[j]))
                assert int(got[i, j].to(torch.int64)) == _murmur3_x86_32(data), (i, j)
    finally:
        sys.path.remove(str(sglang_cpu.SITE_DIR))
        sys.modules.pop("sgl_kernel", None)


@pytest.mark.slow
@pytest.mark.extended  # the default suite relies on it: tests/e2e/test_resume_e2e.py (fresh server after resume)
def test_sampling_seed_reproducible_across_server_history(tmp_path):
    """A seeded request gives the same tokens and log-probs on a fresh server and on a server
    that sampled other requests before (the resume case); without the fix SGLang 0.5.23 on CPU
    ignores ``sampling_seed`` and samples from its global RNG."""
    from drpo_megatron.config import ModelConfig, TaskConfig
    from drpo_megatron.models.tiny import ensure_tiny_checkpoint
    from drpo_megatron.rollout.server import ServerConfig, SGLangServer

    m = ModelConfig()
    policy = ensure_tiny_checkpoint(m.cache_dir, m.tiny, max_operand=TaskConfig().max_operand,
                                    show_progress=False)
    from transformers import AutoTokenizer

    from drpo_megatron.models.tiny import prompt_ids

    prompt = [prompt_ids(AutoTokenizer.from_pretrained(str(policy)), "What is 3 + 4?")] * 3
    # temperature 2: the warm-started policy is confident, seeds must visibly matter
    params = [{"n": 1, "temperature": 2.0, "max_new_tokens": 12, "sampling_seed": s}
              for s in (11, 12, 13)]

    def draw(server):
        outs = server.generate(prompt, params, return_logprob=True)
        return [(o["output_ids"], [e[0] for e in o["meta_info"]["output_token_logprobs"]])
                for o in outs]

    cfg = ServerConfig(startup_timeout_s=240, request_timeout_s=120)
    with SGLangServer(policy, cfg, tmp_path, name="first").start() as s:
        s.wait_healthy()
        fresh = draw(s)
        s.generate(prompt, {"n": 4, "temperature": 1.0, "max_new_tokens": 12})  # unseeded history
        again = draw(s)
    with SGLangServer(policy, cfg, tmp_path, name="second").start() as s:
        s.wait_healthy()
        s.generate(prompt[:1], {"n": 2, "temperature": 1.0, "max_new_tokens": 7})
        restarted = draw(s)
    assert len({tuple(ids) for ids, _ in fresh}) > 1  # distinct seeds, distinct samples
    assert again == fresh and restarted == fresh


def test_routed_experts_host_buffer_still_needs_unpinned_cpu_alloc():
    """--enable-return-routed-experts (routing replay) allocates its host buffer through
    ``ALLOC_MEMORY_FUNCS[device]``; SGLang 0.5.23's entry for "cpu" pins it with
    cudaHostRegister and fails without CUDA (the server died at start-up).  In the server's
    environment (our site folder) the fix's allocator is installed; SGLang's own fails."""
    site_env = sglang_cpu.server_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    code = ("import torch\nfrom sglang.srt.mem_cache.pool_host import common\n"
            "funcs = common.ALLOC_MEMORY_FUNCS\nassert funcs['cpu']._drpo_unpinned\n"
            "buf = funcs['cpu']((4, 2, 2), torch.int32, 'cpu', True, common.HostTensorAllocator())\n"
            "assert buf.shape == (4, 2, 2)\nprint('fixed ok')\n"
            "funcs.pop('cpu')  # SGLang's own entry (the defaultdict's alloc_with_host_register)\n"
            "funcs['cpu']((4, 2, 2), torch.int32, 'cpu', True, common.HostTensorAllocator())\n")
    r = _run(code, sglang_cpu.CPU_SERVER_ENV, pythonpath=site_env["PYTHONPATH"])
    assert "fixed ok" in r.stdout, r.stderr[-2000:]
    assert r.returncode != 0 and "Torch not compiled with CUDA enabled" in r.stderr, (
        "SGLang's cpu host allocator works without CUDA now: remove unpinned_cpu_host_buffers")
