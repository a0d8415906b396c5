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
