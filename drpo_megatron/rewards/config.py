"""The ``reward`` section of a run config: which reward, its time limit, what failures do.

``reward.kind``:

``math_verify`` (default)
    1.0 when the last ``\\boxed{}`` of the response equals the example's ``answer`` by math-verify
    (:mod:`drpo_megatron.rewards.math_reward`).
``function``
    ``reward.function`` = ``"package.module:function"`` (importable from the run's environment)
    or ``"path/to/file.py:function"`` (relative to the config file's directory).  Called as
    ``fn(prompt, response, meta)`` (``reward.batched: false``) or
    ``fn(prompts, responses, metas)`` -> list (``reward.batched: true``); ``async def`` works for
    both.  Returns a number or a dict ``{"score": number, **extra}``; numeric extras are logged
    as ``rollout/reward/<field>`` (mean over the step).  docs/rewards.md has the contract.
``http``
    ``POST reward.http.url`` with ``{"prompts", "responses", "metas"}`` (``http.batch_size``
    samples per request, ``http.concurrency`` requests in flight, ``http.timeout_s`` per request,
    ``http.retries`` retries on connection errors, timeouts, 429 and 5xx) answering
    ``{"rewards": [number | {"score": ...}, ...]}``.

Time limit: every call of a ``math_verify`` / ``function`` reward runs in a worker process and is
killed (SIGKILL) after ``timeout_s`` seconds per sample (a batched call gets ``timeout_s`` x its
batch size); the sample then scores ``timeout_score`` and counts in
``rollout/reward/timeout_count``.  An HTTP request past ``http.timeout_s`` (after its retries)
counts the same way.

Failures (an exception, NaN / inf, a value that is not a number, a list of the wrong length, an
HTTP error after the retries): ``on_error: raise`` stops the run with an error naming the reward,
the sample and the value; ``on_error: fallback`` scores the sample ``fallback_score``, logs it
and counts it in ``rollout/reward/fallback_count``.  A call where more than
``max_failure_frac`` of the samples timed out or fell back raises anyway (a dead reward server
must not silently train on fallback scores).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field

from drpo_megatron.errors import InputError
from drpo_megatron.schema import Section

# the workers' default count: CPU-bound rewards (math-verify) scale with processes, but every
# worker holds its own interpreter (+ sympy: ~100 MB)
MAX_DEFAULT_WORKERS = 4


class RewardConfigError(InputError):
    """A ``reward.*`` value is invalid; the message names the field, the value and the fix."""


#: reward.kind
RewardKind = Literal["math_verify", "function", "http"]
#: reward.on_error
OnError = Literal["raise", "fallback"]


class HttpRewardConfig(Section):
    """``reward.http``: a reward server (``reward.kind: http``)."""

    url: str = ""
    """The endpoint, e.g. http://rm-host:8000/score."""
    batch_size: int = Field(default=32, ge=1)
    """Samples per POST."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Per request (connect + read); then a retry, then timeout_score."""
    retries: int = Field(default=2, ge=0)
    """Extra attempts on connection errors, timeouts, HTTP 429 / 5xx."""
    backoff_s: float = Field(default=0.5, ge=0)
    """urllib3 Retry backoff_factor: sleeps 0, 2x, 4x ... this."""
    concurrency: int = Field(default=4, ge=1)
    """Requests in flight."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers, e.g. {Authorization: "Bearer ..."}."""


class RewardConfig(Section):
    """``reward``: what scores a response (module docstring, docs/rewards.md)."""

    kind: RewardKind = "math_verify"
    """math_verify (\\boxed{} answer vs the example's answer) | function | http."""
    function: str = ""
    """kind function: "package.module:function" or "path/to/file.py:function" (relative to the
    config file's directory)."""
    batched: bool = False
    """fn(prompts, responses, metas) -> list, one call per batch_size samples."""
    batch_size: int = Field(default=64, ge=1)
    """Samples per batched call."""
    concurrency: int = Field(default=16, ge=1)
    """Async per-sample functions: coroutines in flight per worker."""
    workers: int = Field(default=0, ge=0)
    """Worker processes (0: min(4, CPUs))."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Per sample: the call is killed after this many seconds."""
    timeout_score: float = 0.0
    """The reward of a sample whose call was killed."""
    on_error: OnError = "raise"
    """raise (stop the run naming the sample) | fallback (score fallback_score, counted)."""
    fallback_score: float = 0.0
    """on_error: fallback: the reward of a sample whose reward failed."""
    max_failure_frac: float = Field(default=0.5, gt=0, le=1)
    """More timed-out + fallback samples than this fraction in one call: raise anyway."""
    http: HttpRewardConfig = Field(default_factory=HttpRewardConfig)
    """kind http: the reward server."""

    @property
    def num_workers(self) -> int:
        return self.workers or max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def _bad(path: str, value, why: str, fix: str):
    raise RewardConfigError(f"{path}={value!r}: {why}; {fix}")


def resolve_reward_paths(cfg: RewardConfig, base_dir: str | os.PathLike | None) -> None:
    """Make a ``path/to/file.py:function`` spec absolute, relative to ``base_dir`` (the config
    file's directory; None: the working directory), so the resolved config.yaml of the run still
    points at the file."""
    spec = cfg.function
    if not spec or ":" not in spec:
        return
    module, _, name = spec.rpartition(":")
    if not module.endswith(".py"):
        return
    p = Path(module).expanduser()
    if not p.is_absolute():
        p = Path(base_dir or Path.cwd()) / p
    cfg.function = f"{p.resolve()}:{name}"


def check_reward_config(cfg: RewardConfig) -> None:
    """Everything about ``reward.*`` that needs no server: kinds, numbers, and for
    ``kind: function`` that the function imports and takes ``(prompt, response, meta)`` (or the
    batched lists).  Raises :class:`RewardConfigError`."""
    from drpo_megatron.rewards.loader import check_signature, load_function

    if cfg.kind not in get_args(RewardKind):
        _bad("reward.kind", cfg.kind, f"must be one of {list(get_args(RewardKind))}",
             "set reward.kind: math_verify (default), function or http")
    if cfg.on_error not in get_args(OnError):
        _bad("reward.on_error", cfg.on_error, f"must be one of {list(get_args(OnError))}",
             "set reward.on_error: raise (default) or fallback")
    for name in ("timeout_s",):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            _bad(f"reward.{name}", v, "must be a finite number > 0", f"set reward.{name}: 10")
    for name in ("timeout_score", "fallback_score"):
        v = getattr(cfg, name)
        if not math.isfinite(v):
            _bad(f"reward.{name}", v, "must be finite", f"set reward.{name}: 0.0")
    if not 0 < cfg.max_failure_frac <= 1:
        _bad("reward.max_failure_frac", cfg.max_failure_frac, "must be in (0, 1]",
             "set it to 1.0 to never raise on timeouts / fallbacks, default 0.5")
    for name in ("batch_size", "concurrency"):
        if getattr(cfg, name) < 1:
            _bad(f"reward.{name}", getattr(cfg, name), "must be >= 1", f"set reward.{name}: 16")
    if cfg.workers < 0:
        _bad("reward.workers", cfg.workers, "must be >= 0", "set 0 (auto) or a process count")
    if cfg.kind == "function":
        if not cfg.function:
            _bad("reward.function", cfg.function, "reward.kind is 'function' but no function is "
                 "named", "set reward.function: package.module:function or "
                 "path/to/file.py:function")
        fn = load_function(cfg.function)
        check_signature(fn, cfg.function, batched=cfg.batched)
    elif cfg.function:
        _bad("reward.function", cfg.function, f"is only read with reward.kind: function (kind is "
             f"{cfg.kind!r})", "set reward.kind: function, or remove reward.function")
    if cfg.kind == "http":
        h = cfg.http
        if not h.url.startswith(("http://", "https://")):
            _bad("reward.http.url", h.url, "reward.kind is 'http' but the URL is not http(s)://",
                 "set reward.http.url: http://HOST:PORT/PATH of the reward server")
        for name in ("batch_size", "concurrency"):
            if getattr(h, name) < 1:
                _bad(f"reward.http.{name}", getattr(h, name), "must be >= 1",
                     f"set reward.http.{name}: 4")
        if h.retries < 0:
            _bad("reward.http.retries", h.retries, "must be >= 0", "set reward.http.retries: 2")
        if not (math.isfinite(h.timeout_s) and h.timeout_s > 0):
            _bad("reward.http.timeout_s", h.timeout_s, "must be a finite number > 0",
                 "set reward.http.timeout_s: 60")
        if not (math.isfinite(h.backoff_s) and h.backoff_s >= 0):
            _bad("reward.http.backoff_s", h.backoff_s, "must be >= 0",
                 "set reward.http.backoff_s: 0.5")
        bad_headers = {k: v for k, v in h.headers.items() if not isinstance(v, str)}
        if bad_headers:
            _bad("reward.http.headers", bad_headers, "header values must be strings",
                 "quote them in the YAML")
