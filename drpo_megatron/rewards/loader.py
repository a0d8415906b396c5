"""Import a reward function from ``reward.function`` and check that it can be called.

Specs: ``"package.module:function"`` (imported with :func:`importlib.import_module`, i.e. from the
run's environment / ``PYTHONPATH``) or ``"/abs/or/relative/file.py:function"`` (loaded from the
file; :func:`~drpo_megatron.rewards.config.resolve_reward_paths` makes a relative path absolute
against the config file's directory first).  The reward workers import the function again from the
same spec, so a spec that works here works there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from drpo_megatron.rewards.config import RewardConfigError

PER_SAMPLE_SIGNATURE = "fn(prompt: str, response: str, meta: dict) -> float | dict"
BATCHED_SIGNATURE = ("fn(prompts: list[str], responses: list[str], metas: list[dict]) -> "
                     "list[float | dict]")


def _fail(spec: str, why: str, fix: str):
    raise RewardConfigError(f"reward.function={spec!r}: {why}; {fix}")


def load_function(spec: str) -> Callable:
    """The callable named by ``spec``; :class:`RewardConfigError` naming the spec when the module
    does not import, the attribute is missing or is not callable."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        _fail(spec, "expected 'package.module:function' or 'path/to/file.py:function'",
              "write the module, a colon, and the function name")
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            _fail(spec, f"file {str(path)!r} not found", "give a path relative to the config "
                  "file's directory, or an absolute one")
        # one module per file (the name carries a hash of the path): two files named reward.py
        # in different directories do not shadow each other
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        mod_name = f"drpo_user_reward_{path.stem}_{digest}"
        mod = sys.modules.get(mod_name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(mod)
            except Exception as e:  # noqa: BLE001 - whatever the user's module raises
                _fail(spec, f"importing {str(path)!r} raised {type(e).__name__}: {e}",
                      "fix the file so that it imports on its own")
            sys.modules[mod_name] = mod
    else:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - ImportError or whatever the module raises
            _fail(spec, f"module {module!r} does not import ({type(e).__name__}: {e})",
                  "install the package or add its directory to PYTHONPATH, or use "
                  "path/to/file.py:function")
    fn = getattr(mod, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        _fail(spec, f"{module!r} has no attribute {name!r}", f"use one of its callables {public}")
    if not callable(fn):
        _fail(spec, f"{name!r} is a {type(fn).__name__}, not a function", "name a function")
    return fn


def is_async(fn: Callable) -> bool:
    # a callable object's async __call__ counts too
    call = type(fn).__dict__.get("__call__") if not inspect.isfunction(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def check_signature(fn: Callable, spec: str, *, batched: bool) -> None:
    """``fn`` must accept three positional arguments (``(prompt, response, meta)``, or the three
    lists with ``batched``): checked with :func:`inspect.signature` before any rollout."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: checked when called
    want = BATCHED_SIGNATURE if batched else PER_SAMPLE_SIGNATURE
    args = (["p"], ["r"], [{}]) if batched else ("p", "r", {})
    try:
        sig.bind(*args)
    except TypeError as e:
        other = ("reward.batched: false for " + PER_SAMPLE_SIGNATURE if batched else
                 "reward.batched: true for " + BATCHED_SIGNATURE)
        _fail(spec, f"{getattr(fn, '__name__', fn)}{sig} cannot be called as {want} ({e})",
              f"define it as {want} (or set {other})")
