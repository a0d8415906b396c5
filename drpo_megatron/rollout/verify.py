"""Post-sync equality check: after a weight push, every server must serve the trainer's policy.

A fixed probe prompt is decoded greedily by every server (``temperature 0``: SGLang then returns
log-probs of the untempered logits); the trainer recomputes the log-probs of the same tokens with
its own forward at temperature 1.  The check fails loudly, naming the server, the weight version
and the largest per-token gap, when

* two servers decode different greedy tokens (their weights differ), or
* ``max_t |log p_server(y_t) - log p_trainer(y_t)| > atol``.

Tolerances (``DEFAULT_ATOL``): the server runs in bf16, the trainer in fp32.  Measured on the tiny
Qwen3-MoE (tests/rollout/test_transport_e2e.py): bf16 gaps are a few 1e-3 up to ~1e-2 (bf16 has
8 mantissa bits; logits of size ~10 carry ~0.04 absolute rounding), so 0.1 catches a wrong or
partial update (which moves log-probs by O(1)) with a wide margin.  ``fp8_emulated`` / ``fp8``
serve 128x128 blockwise e4m3 weights (relative weight error up to 2**-4) while the trainer keeps
the unquantized weights: 0.5.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from drpo_megatron.rollout.engine import Sample, parse_sample
from drpo_megatron.rollout.server import SGLangServer, ServerError

log = logging.getLogger(__name__)

DEFAULT_ATOL = {"bf16": 0.1, "fp8_emulated": 0.5, "fp8": 0.5}
PROBE_MAX_NEW_TOKENS = 8


class WeightSyncMismatch(ServerError):
    """A server's outputs after a push do not match the trainer's weights."""


def probe_server(server: SGLangServer, probe_ids: list[int],
                 max_new_tokens: int = PROBE_MAX_NEW_TOKENS) -> Sample:
    """Greedy decode of the probe prompt with per-token log-probs."""
    outs = server.generate([list(probe_ids)], {"n": 1, "temperature": 0.0,
                                               "max_new_tokens": max_new_tokens},
                           return_logprob=True)
    if len(outs) != 1:
        raise ServerError(f"{server.name}: probe /generate returned {len(outs)} outputs, expected 1")
    return parse_sample(outs[0], group_id=0, prompt_ids=probe_ids, answer="",
                        server_name=server.name)


def verify_sync(servers: Sequence[SGLangServer], version: int, probe_ids: list[int],
                reference_logprobs: Callable[[Sample], torch.Tensor], *, atol: float,
                max_new_tokens: int = PROBE_MAX_NEW_TOKENS) -> dict[str, float]:
    """Raise :class:`WeightSyncMismatch` unless every server matches the reference (see module
    doc); returns ``sync/`` metrics (the largest gap over servers)."""
    first: Sample | None = None
    worst = 0.0
    for s in servers:
        sample = probe_server(s, probe_ids, max_new_tokens)
        if sample.weight_version != str(version):
            raise WeightSyncMismatch(
                f"weight sync check: {s.name} answered the probe at weight_version "
                f"{sample.weight_version!r}, expected {version}")
        if first is not None and sample.response_ids != first.response_ids:
            raise WeightSyncMismatch(
                f"weight sync check failed at weight version {version}: {s.name} decodes the probe "
                f"greedily as {sample.response_ids}, {servers[0].name} as {first.response_ids}; the "
                f"servers do not hold the same weights (logs: {s.log_path}, {servers[0].log_path})")
        first = first or sample
        ref = reference_logprobs(sample).float().flatten()
        mu = torch.tensor(sample.rollout_logp, dtype=torch.float32)
        if ref.shape != mu.shape:
            raise WeightSyncMismatch(f"weight sync check: trainer gave {tuple(ref.shape)} log-probs "
                                     f"for {mu.numel()} probe tokens of {s.name}")
        diff = (ref - mu).abs()
        if not torch.isfinite(diff).all():
            raise WeightSyncMismatch(f"weight sync check failed: {s.name} at weight version "
                                     f"{version}: non-finite log-probs (server {mu.tolist()}, "
                                     f"trainer {ref.tolist()})")
        d = float(diff.max()) if diff.numel() else 0.0
        worst = max(worst, d)
        if d > atol:
            t = int(diff.argmax())
            raise WeightSyncMismatch(
                f"weight sync check failed: {s.name} at weight version {version}: max |log p_server "
                f"- log p_trainer| = {d:.4g} > atol {atol:g} (token {t} of {mu.numel()}: id "
                f"{sample.response_ids[t]}, server {float(mu[t]):.4f}, trainer {float(ref[t]):.4f}). "
                f"The server does not serve the trainer's weights; see {s.log_path}")
        log.info("weight sync check: %s at version %d, %d probe tokens, max |dlogp| %.3g (atol %g)",
                 s.name, version, mu.numel(), d, atol)
    return {"sync/probe_max_logprob_diff": worst}


def actor_reference(actor, pad_id: int) -> Callable[[Sample], torch.Tensor]:
    """The trainer's log-probs of a probe sample at temperature 1 (the greedy probe's scale)."""

    def ref(sample: Sample) -> torch.Tensor:
        saved = actor.cfg.temperature
        actor.cfg.temperature = 1.0
        try:
            return actor.compute_logprobs([sample], pad_id)[0]
        finally:
            actor.cfg.temperature = saved

    return ref


class VerifiedTransport:
    """Wraps a transport: every ``push`` is followed by :func:`verify_sync` (rank 0 probes; the
    trainer forward is collective, so every rank runs it)."""

    def __init__(self, inner, servers: Sequence[SGLangServer], probe_ids: list[int],
                 reference_logprobs: Callable[[Sample], torch.Tensor], atol: float):
        self.inner = inner
        self.servers = servers
        self.probe_ids = list(probe_ids)
        self.reference_logprobs = reference_logprobs
        self.atol = atol

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, version: int) -> dict[str, float]:
        import time

        out = dict(self.inner.push(version))
        t0 = time.time()
        out.update(verify_sync(self.servers, version, self.probe_ids, self.reference_logprobs,
                               atol=self.atol))
        out["perf/weight_sync_verify_time_s"] = time.time() - t0
        return out
