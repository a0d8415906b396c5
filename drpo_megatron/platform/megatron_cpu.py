"""CPU compatibility layer for Megatron-Core 0.19.2 and megatron-bridge 0.6.2.

Megatron-Core assumes a CUDA device throughout (``torch.cuda.current_device()``,
hard-coded ``device="cuda"``, CUDA RNG state, CUDA streams, ``'torch.cuda.FloatTensor'``
type checks ...).  This module collects the *narrow* fixes that let the real Megatron-Core
code (models, DDP, optimizers, MoE dispatchers, pipeline schedules, dist checkpointing) and
megatron-bridge's HF conversion run on a CPU-only machine with the gloo backend.

Rules:

* :func:`apply_cpu_compat` is a no-op (patches nothing) when ``torch.cuda.is_available()``.
  Production code paths never depend on this module; they call ``apply_cpu_compat()`` once,
  which does nothing on a GPU machine.
* It is idempotent and may be called before or after ``import megatron.core``: patches of
  Megatron modules that are not imported yet are applied by a post-import hook.
* Each fix is a small named function listed in :data:`CPU_FIXES`, whose docstring names the
  upstream error it addresses.  ``tests/platform/test_megatron_cpu.py`` checks, for every
  fix, that the upstream failure still happens without it, so an upstream change that makes a
  fix obsolete is noticed.
* Model-building code on CPU should also apply :func:`cpu_transformer_overrides` to its
  ``TransformerConfig`` / model provider (fusions off, CPU init, no expert bias, no grouped
  GEMM, local layer spec) and pass an explicit attention mask.

Scope and cost: the device redirect is a ``TorchFunctionMode`` entered on the thread that
calls :func:`apply_cpu_compat` (call it from the main thread; Megatron's compute runs there);
it adds about 4 us of Python per torch call.  Every multi-process entry point must be guarded
by ``if __name__ == "__main__"`` (torch_dist checkpoint saves start processes).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from drpo_megatron.platform.torchvision_ops import define_torchvision_op_schemas

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_FIXES",
    "CpuFix",
    "apply_cpu_compat",
    "applied_fixes",
    "cpu_transformer_overrides",
    "is_cpu_only",
]


# --------------------------------------------------------------------------------------------
# Post-import hooks: patch a module right after it is imported (or now, if it already is).
# --------------------------------------------------------------------------------------------

_HOOK_LOCK = threading.RLock()
_POST_IMPORT_HOOKS: Dict[str, List[Callable[[types.ModuleType], None]]] = {}
_PRE_IMPORT_HOOKS: Dict[str, List[Callable[[], Any]]] = {}


class _HookingLoader(importlib.abc.Loader):
    """Wraps a module's real loader to run pre-/post-exec hooks around ``exec_module``."""

    def __init__(self, loader: importlib.abc.Loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        cleanups = [hook() for hook in _PRE_IMPORT_HOOKS.get(self._fullname, [])]
        try:
            self._loader.exec_module(module)
        finally:
            for cleanup in reversed(cleanups):
                if callable(cleanup):
                    cleanup()
        for hook in _POST_IMPORT_HOOKS.get(self._fullname, []):
            hook(module)

    def __getattr__(self, name):  # get_source, get_code, is_package ... of the real loader
        return getattr(self._loader, name)


class _HookFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that only wraps the loaders of modules that have hooks."""

    _busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _POST_IMPORT_HOOKS and fullname not in _PRE_IMPORT_HOOKS:
            return None
        if getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.name = None
        if spec.loader is None:
            return spec
        spec.loader = _HookingLoader(spec.loader, fullname)
        return spec


_FINDER = _HookFinder()


def _install_finder() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _when_imported(module_name: str, hook: Callable[[types.ModuleType], None]) -> None:
    """Run ``hook(module)`` now if ``module_name`` is imported, else right after its import."""
    with _HOOK_LOCK:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            # Fully or partially imported: patch now (our hooks only touch attributes that
            # exist once the module body has run, so a partial import is not expected here).
            hook(module)
            return
        _POST_IMPORT_HOOKS.setdefault(module_name, []).append(hook)
        _install_finder()


def _patch_attr(owner: Any, name: str, new: Any) -> None:
    """Replace ``owner.name`` keeping the original in ``new.__wrapped_cpu_original__``."""
    old = getattr(owner, name, None)
    if getattr(old, "_drpo_cpu_patch", False):
        return
    try:
        new.__wrapped_cpu_original__ = old
        new._drpo_cpu_patch = True
    except (AttributeError, TypeError):
        pass
    setattr(owner, name, new)


# --------------------------------------------------------------------------------------------
# Fix registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuFix:
    """One CPU fix: ``name``, the function that applies it, and what it addresses."""

    name: str
    apply: Callable[[], None]

    @property
    def doc(self) -> str:
        return (self.apply.__doc__ or "").strip()


CPU_FIXES: List[CpuFix] = []


def _fix(func: Callable[[], None]) -> Callable[[], None]:
    name = func.__name__.lstrip("_").removeprefix("fix_")
    CPU_FIXES.append(CpuFix(name=name, apply=func))
    return func


# --------------------------------------------------------------------------------------------
# Python / import-level fixes (needed to import megatron-bridge)
# --------------------------------------------------------------------------------------------


@_fix
def fix_typing_override() -> None:
    """``typing.override`` on Python 3.11 (added in 3.12).

    megatron-core 0.19.2 (wheel declares Python >= 3.12) has
    ``from typing import ... override`` in ``megatron/training/models/hybrid.py``, which
    ``import megatron.bridge`` imports; on 3.11 that is ``ImportError: cannot import name
    'override' from 'typing'``.  Fix: alias ``typing_extensions.override``.
    """
    if hasattr(typing, "override"):
        return
    import typing_extensions

    typing.override = typing_extensions.override  # type: ignore[attr-defined]


@_fix
def fix_torchvision_op_schemas() -> None:
    """torchvision ``_C`` extension that fails to load on this CPU torch build
    (``RuntimeError: operator torchvision::nms does not exist``, hit by ``import megatron.bridge``
    via ``transformers.modeling_utils``); see :mod:`drpo_megatron.platform.torchvision_ops`."""
    define_torchvision_op_schemas()




class _TEPlaceholder:
    """Stands for a Transformer Engine class that does not exist on CPU."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("Transformer Engine is not available on CPU (drpo CPU stub)")


class _TEStubModule(types.ModuleType):
    """Module whose every attribute is a placeholder class or placeholder sub-namespace."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].islower():
            sub = _TEStubModule(f"{self.__name__}.{name}")
            setattr(self, name, sub)
            return sub
        cls = type(name, (_TEPlaceholder,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


_LORA_MODULE = "megatron.bridge.peft.lora_layers"


def _imports_of(module_name: str) -> List[str]:
    """Top-level ``import``/``from`` targets of a module's source (no execution)."""
    spec = None
    for finder in sys.meta_path:
        if finder is _FINDER or not hasattr(finder, "find_spec"):
            continue
        parent = module_name.rpartition(".")[0]
        path = getattr(sys.modules.get(parent), "__path__", None)
        spec = finder.find_spec(module_name, path)
        if spec is not None:
            break
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return []
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _lora_pre_import():
    """Import lora_layers' real dependencies first, then expose the TE stub only to it."""
    for dep in _imports_of(_LORA_MODULE):
        if not dep.startswith("transformer_engine"):
            importlib.import_module(dep)
    stubs = {}
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        if name not in sys.modules:
            stubs[name] = sys.modules[name] = _TEStubModule(name)
    if "transformer_engine.pytorch" in stubs and "transformer_engine" in stubs:
        stubs["transformer_engine"].pytorch = stubs["transformer_engine.pytorch"]

    def cleanup():
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]

    return cleanup


@_fix
def fix_transformer_engine_stub_for_bridge_lora() -> None:
    """megatron-bridge imports Transformer Engine unconditionally in its LoRA module.

    ``megatron/bridge/peft/lora_layers.py`` line 20: ``import transformer_engine.pytorch as te``
    is on the import path of ``import megatron.bridge`` (via ``models.conversion.peft_bridge``
    -> ``peft.canonical_lora``), so on CPU (TE cannot be installed) it fails with
    ``ModuleNotFoundError: No module named 'transformer_engine'``.  Fix: while (and only while)
    that one module executes, ``sys.modules`` holds a stub ``transformer_engine`` whose classes
    raise when instantiated; the stub is removed right after, so Megatron-Core's and the
    bridge's own ``HAVE_TE`` checks still see no Transformer Engine.
    """
    if importlib.util.find_spec("transformer_engine") is not None:
        return  # real TE present: nothing to do
    if _LORA_MODULE in sys.modules:
        return
    with _HOOK_LOCK:
        hooks = _PRE_IMPORT_HOOKS.setdefault(_LORA_MODULE, [])
        if _lora_pre_import not in hooks:
            hooks.append(_lora_pre_import)
        _install_finder()


# --------------------------------------------------------------------------------------------
# torch.cuda facade and device redirection
# --------------------------------------------------------------------------------------------


class _CpuStream:
    """Stands for a CUDA stream on CPU: every operation is synchronous, so all no-ops."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")
        self.priority = kwargs.get("priority", 0)

    def synchronize(self):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _CpuEvent()
        event.record(self)
        return event

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _CpuStream)

    def __hash__(self):
        return 0


_CPU_STREAM = _CpuStream()


class _CpuEvent:
    """Stands for a CUDA event on CPU (records wall-clock time for ``elapsed_time``)."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._t: Optional[float] = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        if self._t is None or end_event._t is None:
            raise RuntimeError("event not recorded")
        return (end_event._t - self._t) * 1000.0


def _cpu_current_device() -> int:
    return 0


def _cpu_current_stream(device=None) -> _CpuStream:
    return _CPU_STREAM


def _cpu_stream_ctx(stream=None):
    return contextlib.nullcontext(stream)


def _noop(*args, **kwargs):
    return None


def _false(*args, **kwargs):
    return False


@_fix
def fix_cuda_facade() -> None:
    """``torch.cuda`` calls that Megatron-Core makes unconditionally.

    About 200 ``torch.cuda.current_device()`` calls (e.g.
    ``megatron/core/tensor_parallel/layers.py``, ``distributed/param_and_grad_buffer.py``,
    ``optimizer/*``), plus ``torch.cuda.Stream()`` / ``current_stream()`` / ``Event()`` /
    ``synchronize()`` (``transformer/moe/token_dispatcher.py``
    ``MoEAlltoAllTokenDispatcher``, ``distributed/distributed_data_parallel.py``,
    ``pipeline_parallel/schedules.py``).  On a CPU build these fail with
    ``AssertionError: Torch not compiled with CUDA enabled`` /
    ``RuntimeError: torch.cuda.Stream requires CUDA support``.  Fix: a facade on
    ``torch.cuda`` for exactly these entry points: device 0 (rewritten to CPU by
    :func:`fix_cuda_device_redirect`), synchronous no-op streams/events.
    ``torch.cuda.is_available()`` is untouched and still returns False.
    """
    cuda = torch.cuda
    _patch_attr(cuda, "current_device", _cpu_current_device)
    _patch_attr(cuda, "set_device", lambda device: None)
    _patch_attr(cuda, "synchronize", lambda device=None: None)
    _patch_attr(cuda, "current_stream", _cpu_current_stream)
    _patch_attr(cuda, "default_stream", _cpu_current_stream)
    _patch_attr(cuda, "stream", _cpu_stream_ctx)
    _patch_attr(cuda, "Stream", _CpuStream)
    _patch_attr(cuda, "Event", _CpuEvent)
    _patch_attr(cuda, "is_current_stream_capturing", lambda: False)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device
    return False


_TENSOR_TYPE_CALLERS = ("megatron.core.optimizer",)
_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _caller_module(depth_limit: int = 8) -> str:
    frame = sys._getframe(2)
    for _ in range(depth_limit):
        if frame is None:
            break
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("torch") and name != __name__:
            return name
        frame = frame.f_back
    return ""


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """TorchFunctionMode that runs CUDA-targeted tensor creation/moves on the CPU."""

    rewrite_devices = False  # set by fix_cuda_device_redirect

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rewrite_devices:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        handler = _SPECIAL_FUNCS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return func(*args, **kwargs)


def _tensor_to(func, args, kwargs):
    if len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    return func(*args, **kwargs)


def _tensor_cuda(func, args, kwargs):
    return args[0]


def _tensor_pin_memory(func, args, kwargs):
    return args[0]


def _tensor_record_stream(func, args, kwargs):
    if len(args) > 1 and isinstance(args[1], _CpuStream):
        return None
    return func(*args, **kwargs)


def _tensor_type(func, args, kwargs):
    out = func(*args, **kwargs)
    if len(args) == 1 and not kwargs and isinstance(out, str) and out in _CPU_TO_CUDA_TYPE:
        if _caller_module().startswith(_TENSOR_TYPE_CALLERS):
            return _CPU_TO_CUDA_TYPE[out]
    return out


_DEVICE_FUNCS: Dict[Any, Callable] = {
    torch.Tensor.to: _tensor_to,
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.pin_memory: _tensor_pin_memory,
    torch.Tensor.record_stream: _tensor_record_stream,
}
_SPECIAL_FUNCS: Dict[Any, Callable] = {}  # handlers of the fixes applied so far

_DEVICE_MODE: Optional[_CudaToCpuMode] = None


def _ensure_device_mode() -> None:
    global _DEVICE_MODE
    if _DEVICE_MODE is None:
        _DEVICE_MODE = _CudaToCpuMode()
        _DEVICE_MODE.__enter__()  # stays on the (main thread's) torch-function mode stack


@_fix
def fix_cuda_device_redirect() -> None:
    """Hard-coded ``device="cuda"`` / ``.cuda()`` / ``pin_memory=True`` in Megatron-Core.

    About 40 sites, e.g. RoPE ``inv_freq`` (``models/common/embeddings/rotary_pos_embedding.py``),
    ``total_num_tokens`` in every schedule of ``pipeline_parallel/schedules.py``,
    ``clip_grads.py`` ``dummy_overflow_buf``, optimizer buffers, and the
    ``device=torch.cuda.current_device()`` arguments.  On CPU they fail with
    ``AssertionError: Torch not compiled with CUDA enabled``.  Fix: a process-wide
    ``TorchFunctionMode`` (main thread) that rewrites CUDA devices (``"cuda"``, ``"cuda:N"``,
    ``torch.device("cuda")``, bare indices) to ``"cpu"`` in ``device=`` arguments and
    ``Tensor.to``, makes ``Tensor.cuda()``/``pin_memory()`` identities and drops
    ``pin_memory=True``.
    """
    _SPECIAL_FUNCS.update(_DEVICE_FUNCS)
    _CudaToCpuMode.rewrite_devices = True
    _ensure_device_mode()


def _patch_checkpoint_backward(mod: types.ModuleType) -> None:
    for name in ("CheckpointFunction", "CheckpointWithoutOutputFunction"):
        cls = getattr(mod, name, None)
        if cls is None:
            continue
        original = cls.backward
        if getattr(original, "_drpo_cpu_patch", False):
            continue

        def backward(ctx, *args, _original=original):
            with _DEVICE_MODE:  # re-entered: backward runs with the mode switched off
                return _original(ctx, *args)

        backward._drpo_cpu_patch = True
        backward.__wrapped_cpu_original__ = original
        cls.backward = staticmethod(backward)


@_fix
def fix_recompute_device_redirect() -> None:
    """Activation recompute (``recompute_granularity`` full / selective) re-runs forward code in
    backward without the CUDA -> CPU redirect.

    A ``TorchFunctionMode`` is switched off while its own handler runs, and ``loss.backward()`` /
    ``torch.autograd.backward`` (which the schedules call) are handled by the mode as one call:
    everything the autograd engine runs inside, including the forward that
    ``megatron/core/tensor_parallel/random.py`` ``CheckpointFunction.backward`` recomputes, runs
    without :func:`fix_cuda_device_redirect`.  The MoE router's
    ``self.weight.data.to(device=torch.cuda.current_device())``
    (``transformer/moe/router.py``) then fails with ``RuntimeError: Cannot access accelerator
    device when none is available``.  Fix: the recomputing ``backward`` of Megatron's checkpoint
    functions re-enters the device mode.
    """
    _ensure_device_mode()
    _when_imported("megatron.core.tensor_parallel.random", _patch_checkpoint_backward)


def _without_own_dispatch(fn: Callable) -> Callable:
    """A copy of ``fn`` whose own ``has_torch_function`` check answers no, so calling it from a
    mode's handler does not dispatch to the mode again (everything it calls still does)."""
    g = dict(fn.__globals__, has_torch_function=lambda args: False)
    clone = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


_AUTOGRAD_BACKWARD = _without_own_dispatch(torch.autograd.backward)


def _backward_in_device_mode(func, args, kwargs):
    # the mode is off while it handles this call: enter it again for the whole backward pass
    with _DEVICE_MODE:
        return _AUTOGRAD_BACKWARD(*args, **kwargs)


@_fix
def fix_device_redirect_in_nested_backward() -> None:
    """Activation recompute runs a backward inside a backward, outside the device redirect.

    ``megatron/core/tensor_parallel/random.py`` ``CheckpointFunction.backward`` (``parallel.
    recompute: full``) reruns the layer and calls ``torch.autograd.backward`` on it; that call
    goes through the process-wide ``TorchFunctionMode`` of ``cuda_device_redirect``, which is
    switched off while it handles a call, so every allocation on the recomputed graph's
    backward path sees the real ``torch.empty(..., device=torch.cuda.current_device())``, e.g.
    the sequence-parallel reduce-scatter (``tensor_parallel/mappings.py``
    ``_reduce_scatter_along_first_dim`` under TP > 1): ``RuntimeError: Cannot access
    accelerator device when none is available``.  Fix: ``torch.autograd.backward`` runs with
    the mode entered again (a copy of it that skips its own dispatch to the mode).
    """
    _SPECIAL_FUNCS[torch.autograd.backward] = _backward_in_device_mode
    _ensure_device_mode()


@_fix
def fix_cuda_tensor_type_checks() -> None:
    """Optimizers compare ``param.type()`` with ``'torch.cuda.FloatTensor'``.

    ``megatron/core/optimizer/distrib_optimizer.py``
    ``_build_model_and_main_param_groups`` (``TypeError: Wrapped parameters must be one of
    torch.cuda.FloatTensor, torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor. Received
    torch.FloatTensor``), ``optimizer.py`` ``Float16OptimizerWithFloat16Params`` and
    ``clip_grads.py`` ``clip_grad_by_total_norm_fp32`` (``AssertionError`` on
    ``param.grad.type() == 'torch.cuda.FloatTensor'``).  Fix: ``Tensor.type()`` (no
    arguments) reports the ``torch.cuda.*`` name for CPU float tensors only when called from
    ``megatron.core.optimizer``; everyone else sees the true type.
    """
    _SPECIAL_FUNCS[torch.Tensor.type] = _tensor_type
    _ensure_device_mode()


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def _make_cpu_rng_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """Megatron's RNG-states tracker backed by the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _patch_rng(random_mod: types.ModuleType) -> None:
    base = random_mod.CudaRNGStatesTracker
    if getattr(base, "_drpo_cpu_patch", False):
        return
    cls = _make_cpu_rng_tracker_class(base)
    cls._drpo_cpu_patch = True
    random_mod.CudaRNGStatesTracker = cls

    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    _patch_attr(random_mod, "_get_cuda_rng_state", _get_rng_state)
    _patch_attr(random_mod, "_set_cuda_rng_state", _set_rng_state)
    # A tracker created before the patch (unlikely) is replaced on next initialisation.
    if random_mod._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        random_mod._CUDA_RNG_STATE_TRACKER, cls
    ):
        random_mod._CUDA_RNG_STATE_TRACKER = None
        random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


@_fix
def fix_cpu_rng_tracker() -> None:
    """Megatron's RNG tracker reads and writes CUDA generator states.

    ``megatron/core/tensor_parallel/random.py``: ``model_parallel_cuda_manual_seed`` ->
    ``CudaRNGStatesTracker.add`` calls ``torch.cuda.get_rng_state()`` (``AssertionError:
    Torch not compiled with CUDA enabled``); ``fork`` and activation recomputation use
    ``_get_cuda_rng_state``/``_set_cuda_rng_state``.  Fix: the tracker class (looked up by
    ``initialize_rng_tracker`` at call time) becomes a subclass whose named states are CPU
    generator states, swapped into the CPU default generator inside ``fork``; the two module
    helpers read/write the CPU default generator.
    """
    _when_imported("megatron.core.tensor_parallel.random", _patch_rng)


# --------------------------------------------------------------------------------------------
# MoE and sequence parallel
# --------------------------------------------------------------------------------------------


def _patch_moe_split_sizes(mod: types.ModuleType) -> None:
    original = mod.maybe_move_tensor_to_cpu
    if getattr(original, "_drpo_cpu_patch", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        out = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out) and out.device.type == "cpu":
            out = out.numpy()
        return out

    maybe_move_tensor_to_cpu._drpo_cpu_patch = True
    maybe_move_tensor_to_cpu.__wrapped_cpu_original__ = original
    mod.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


@_fix
def fix_moe_alltoall_split_sizes() -> None:
    """MoE alltoall dispatcher passes CPU tensors as all-to-all split sizes.

    ``megatron/core/transformer/moe/token_dispatcher.py``
    ``MoEAlltoAllTokenDispatcher.preprocess`` obtains ``input_splits``/``output_splits`` via
    ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts to numpy only
    when ``tensor.is_cuda``.  On CPU the tensors stay tensors and
    ``torch.distributed.all_to_all_single`` fails with ``TypeError:
    all_to_all_single(): incompatible function arguments``.  Fix: also convert CPU tensors
    when ``as_numpy=True`` (in the dispatcher's imported name).
    """
    _when_imported("megatron.core.transformer.moe.token_dispatcher", _patch_moe_split_sizes)


def _patch_torch_norm(mod: types.ModuleType) -> None:
    cls = mod.WrappedTorchNorm
    original_new = cls.__new__
    if getattr(original_new, "_drpo_cpu_patch", False):
        return

    def __new__(klass, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(klass, config, hidden_size, *args, **kwargs)
        import dataclasses

        # Build the plain torch norm without the assert, then tag its params so that
        # finalize_model_grads all-reduces their grads across TP (as TE's norm does).
        plain = dataclasses.replace(config, sequence_parallel=False)
        norm = original_new(klass, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__._drpo_cpu_patch = True
    __new__.__wrapped_cpu_original__ = original_new
    cls.__new__ = __new__


@_fix
def fix_torch_norm_sequence_parallel() -> None:
    """The local (non-TE) norm refuses sequence parallelism; MoE + TP requires it.

    ``megatron/core/transformer/torch_norm.py`` ``WrappedTorchNorm.__new__``:
    ``AssertionError: sequence parallel not supported by torch LayerNorm`` while
    ``TransformerConfig`` requires ``sequence_parallel`` for MoE with TP > 1.  Fix: build the
    torch norm from a copy of the config without ``sequence_parallel`` and mark its
    parameters ``sequence_parallel=True`` so that ``finalize_model_grads`` all-reduces their
    gradients across the TP group (what the TE norm does).
    """
    _when_imported("megatron.core.transformer.torch_norm", _patch_torch_norm)


# --------------------------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------------------------


def _patch_distrib_optimizer_state_dict(mod: types.ModuleType) -> None:
    cls = mod.DistributedOptimizer
    original = cls.state_dict
    if getattr(original, "_drpo_cpu_patch", False):
        return

    def state_dict(self):
        inner = self.optimizer
        if getattr(mod, "HAVE_APEX_OR_TE", True) or not isinstance(inner, torch.optim.Optimizer):
            return original(self)
        # A fresh torch optimizer has no per-param "step" yet: give the empty states step 0
        # for the duration of the call, so that the step extraction finds exactly one value.
        injected = []
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    injected.append(p)
        try:
            return original(self)
        finally:
            for p in injected:
                inner.state.pop(p, None)

    state_dict._drpo_cpu_patch = True
    state_dict.__wrapped_cpu_original__ = original
    cls.state_dict = state_dict


@_fix
def fix_distrib_optimizer_fresh_state_dict() -> None:
    """DistributedOptimizer without Apex/TE cannot describe a fresh optimizer's state.

    ``megatron/core/optimizer/distrib_optimizer.py`` ``DistributedOptimizer.state_dict``
    (reached by ``sharded_state_dict(..., is_loading=True)`` when loading a checkpoint into a
    new optimizer) takes the step from torch Adam's per-param ``state[p]["step"]``; before the
    first step there is none and ``assert len(steps) == 1`` fails (``AssertionError``).  With
    Transformer Engine or Apex (GPU) another branch is used.  Fix: while ``state_dict`` runs,
    empty per-param states hold ``step = 0``; they are removed afterwards (the checkpoint
    load then sets the real states).
    """
    _when_imported("megatron.core.optimizer.distrib_optimizer", _patch_distrib_optimizer_state_dict)


class _NoneForMissing(dict):
    """dict whose missing keys read as None (Megatron skips non-tensor entries)."""

    def __missing__(self, key):
        return None


def _patch_distrib_optimizer_set_states(mod: types.ModuleType) -> None:
    cls = mod.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_drpo_cpu_patch", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        return original(self, model_param, _NoneForMissing(tensors))

    _set_main_param_and_optimizer_states._drpo_cpu_patch = True
    _set_main_param_and_optimizer_states.__wrapped_cpu_original__ = original
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


@_fix
def fix_distrib_optimizer_load_torch_adam_step() -> None:
    """Loading a DistributedOptimizer checkpoint into torch Adam fails on its ``step`` state.

    ``megatron/core/optimizer/distrib_optimizer.py``
    ``load_parameter_state_from_fully_reshardable`` leaves torch Adam's per-param ``"step"``
    out of the tensors it passes on ("handled separately": ``load_state_dict`` sets it from
    the param groups), but ``_set_main_param_and_optimizer_states`` copies every tensor of
    the optimizer's state, ``step`` included, and fails with ``KeyError: 'step'``.  Only the
    no-Apex/TE path (CPU) has a per-param ``step`` tensor.  Fix: entries missing from the
    loaded tensors read as None, which that function already skips.
    """
    _when_imported("megatron.core.optimizer.distrib_optimizer", _patch_distrib_optimizer_set_states)


def _patch_distrib_optimizer_load_state_dict(mod: types.ModuleType) -> None:
    cls = mod.DistributedOptimizer
    original = cls.load_state_dict
    if getattr(original, "_drpo_cpu_patch", False):
        return

    def load_state_dict(self, state_dict):
        out = original(self, state_dict)
        if not getattr(mod, "HAVE_APEX_OR_TE", True) and isinstance(
                self.optimizer, torch.optim.Optimizer):
            seen = set()
            for state in self.optimizer.state.values():
                step = state.get("step")
                if torch.is_tensor(step):
                    if id(step) in seen:
                        state["step"] = step.clone()
                    seen.add(id(state["step"]))
        return out

    load_state_dict._drpo_cpu_patch = True
    load_state_dict.__wrapped_cpu_original__ = original
    cls.load_state_dict = load_state_dict


@_fix
def fix_distrib_optimizer_shared_step_after_load() -> None:
    """After loading, all torch-Adam params of a DistributedOptimizer share ONE step tensor.

    ``megatron/core/optimizer/distrib_optimizer.py`` ``DistributedOptimizer.load_state_dict``
    (no Apex/TE branch) sets ``s["step"] = step`` with the same tensor for every param state;
    torch Adam increments each param's step in place, so after a checkpoint load the shared
    step advances by the number of params per optimizer step (33 for the tiny test model)
    and Adam's bias correction is wrong: the loss after a resumed step differs from the
    uninterrupted run (no exception).  Fix: give each param state its own copy of the step.
    """
    _when_imported("megatron.core.optimizer.distrib_optimizer", _patch_distrib_optimizer_load_state_dict)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_APPLIED: List[str] = []
_APPLY_LOCK = threading.Lock()


def is_cpu_only() -> bool:
    """True when no CUDA device is available (the CPU layer applies)."""
    return not torch.cuda.is_available()


def apply_cpu_compat(exclude: Optional[List[str]] = None) -> List[str]:
    """Apply every CPU fix (idempotent); no-op and ``[]`` when CUDA is available.

    ``exclude`` names fixes to leave out (used by the tests that show each fix is needed).
    Returns the names of the fixes applied so far.
    """
    if torch.cuda.is_available():
        return []
    exclude = set(exclude or ())
    unknown = exclude - {f.name for f in CPU_FIXES}
    if unknown:
        raise ValueError(f"unknown CPU fixes: {sorted(unknown)}")
    with _APPLY_LOCK:
        for fix in CPU_FIXES:
            if fix.name in exclude or fix.name in _APPLIED:
                continue
            fix.apply()
            _APPLIED.append(fix.name)
            logger.debug("applied CPU fix %s", fix.name)
    return list(_APPLIED)


def applied_fixes() -> List[str]:
    """Names of the CPU fixes applied in this process."""
    return list(_APPLIED)


def cpu_transformer_overrides() -> Dict[str, Any]:
    """TransformerConfig / model-provider fields that the CPU path needs.

    Apply with ``for k, v in cpu_transformer_overrides().items(): setattr(cfg, k, v)`` (only
    the attributes the object has), or :func:`drpo_megatron.models.megatron_model`'s helpers.
    Besides these, use the local layer spec (``get_gpt_layer_local_spec``) and pass an
    explicit attention mask.
    """
    return {
        "use_cpu_initialization": True,
        "add_bias_linear": False,
        "moe_grouped_gemm": False,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": False,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
        "fused_single_qkv_rope": False,
        "fused_residual_rmsnorm": False,
        "transformer_impl": "local",
    }
