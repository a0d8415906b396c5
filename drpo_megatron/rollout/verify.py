"""Post-sync equality check: after a weight push, every server must serve the trainer's policy.

A fixed probe prompt is decoded greedily by every server (``temperature 0``: SGLang then returns
log-probs of the untempered logits) and sampled a few times at temperature 1 with a fixed seed
(off the greedy path log-probs are far from 0, so a weight difference shows even on a confident
model); the trainer recomputes the log-probs of the same tokens with its own forward at
temperature 1.  The check fails loudly, naming the server, the weight version
and the largest per-token gap, when

* two servers decode different greedy tokens (their weights differ), or
* ``max_t |log p_server(y_t) - log p_trainer(y_t)| > atol``.

Tolerances (``DEFAULT_ATOL``, ``rollout.verify_sync_atol`` overrides): the server runs in bf16,
the trainer in fp32.  Measured (tests/rollout/): the trained tiny Qwen3-MoE vs the Megatron actor,
max gap 1e-4..4e-4 (bf16 and fp8_emulated, a confident model); a randomly perturbed tiny model vs
an fp32 HF forward of the pushed weights, up to 0.03 on greedy and 0.07 on sampled probe tokens
(bf16 carries 8 mantissa bits: logits of size ~10 round by ~0.04).  A stale or partial update
moves log-probs by O(1).  Defaults: bf16 0.15; ``fp8_emulated`` / ``fp8`` 0.5 (the server holds
128x128 blockwise e4m3 weights, relative weight error up to 2**-4, while the trainer keeps the
unquantized ones); ``nvfp4_emulated`` / ``mxfp4_emulated`` 1.0 (4-bit weights: on the warm-started
tiny model vs its fp32 forward, max |dlogp| 0.38 / 0.27 and mean 0.0037 / 0.0058 over 419 sampled
tokens; bf16 0.017 / 0.0004, fp8_emulated 0.032 / 0.0010).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from drpo_megatron.dist import is_driver, raise_everywhere, share
from drpo_megatron.rollout.engine import parse_sample
from drpo_megatron.rollout.server import SGLangServer, ServerError
from drpo_megatron.samples import Sample

log = logging.getLogger(__name__)

DEFAULT_ATOL = {"bf16": 0.15, "fp8_emulated": 0.5, "fp8": 0.5, "nvfp4_emulated": 1.0,
                "mxfp4_emulated": 1.0}
PROBE_MAX_NEW_TOKENS = 8
PROBE_SAMPLES = 4
PROBE_SEED = 1234


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


def probe_server_sampled(server: SGLangServer, probe_ids: list[int], n: int = PROBE_SAMPLES,
                         max_new_tokens: int = PROBE_MAX_NEW_TOKENS, seed: int = PROBE_SEED
                         ) -> list[Sample]:
    """``n`` seeded samples at temperature 1: tokens off the greedy path, where log-probs are
    far from 0 and a weight difference shows (a confident model's greedy log-probs are ~0)."""
    outs = server.generate([list(probe_ids)], {"n": n, "temperature": 1.0, "top_p": 1.0,
                                               "max_new_tokens": max_new_tokens,
                                               "sampling_seed": seed}, return_logprob=True)
    if len(outs) != n:
        raise ServerError(f"{server.name}: probe /generate returned {len(outs)} outputs, expected {n}")
    return [parse_sample(o, group_id=0, prompt_ids=probe_ids, answer="", server_name=server.name)
            for o in outs]


def probe_all(servers: Sequence[SGLangServer], probe_ids: list[int], *,
              max_new_tokens: int = PROBE_MAX_NEW_TOKENS,
              num_sampled: int = PROBE_SAMPLES) -> list[list[Sample]]:
    """Per server: the greedy probe decode followed by ``num_sampled`` seeded samples.  The
    server's prefix cache is flushed afterwards: the check leaves no state that the next rollout
    could reuse (a resumed run must sample exactly as the uninterrupted one)."""
    out = []
    for s in servers:
        greedy = probe_server(s, probe_ids, max_new_tokens)
        extra = probe_server_sampled(s, probe_ids, num_sampled, max_new_tokens) if num_sampled else []
        s.flush_cache()
        out.append([greedy, *extra])
    return out


def compare_probes(servers: Sequence[SGLangServer], version: int, probes: list[list[Sample]],
                   refs: list[list[torch.Tensor]], *, atol: float) -> dict[str, float]:
    """Raise :class:`WeightSyncMismatch` unless every server's probe samples (``probes[i]``,
    greedy first) agree with the trainer's log-probs of the same tokens (``refs[i]``)."""
    first: Sample | None = None
    worst = 0.0
    for s, group, group_refs in zip(servers, probes, refs):
        sample = group[0]
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
        ref_l, mus, toks = [], [], []
        for smp, r in zip(group, group_refs):
            r = r.float().flatten()
            m = torch.tensor(smp.rollout_logp, dtype=torch.float32)
            if r.shape != m.shape:
                raise WeightSyncMismatch(f"weight sync check: trainer gave {tuple(r.shape)} "
                                         f"log-probs for {m.numel()} probe tokens of {s.name}")
            ref_l.append(r)
            mus.append(m)
            toks.extend(smp.response_ids)
        ref, mu = torch.cat(ref_l), torch.cat(mus)
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
                f"{toks[t]}, server {float(mu[t]):.4f}, trainer {float(ref[t]):.4f}). "
                f"The server does not serve the trainer's weights; see {s.log_path}")
        log.info("weight sync check: %s at version %d, %d probe tokens, max |dlogp| %.3g (atol %g)",
                 s.name, version, mu.numel(), d, atol)
    return {"sync/probe_max_logprob_diff": worst}


def verify_sync(servers: Sequence[SGLangServer], version: int, probe_ids: list[int],
                reference_logprobs: Callable[[Sample], torch.Tensor], *, atol: float,
                max_new_tokens: int = PROBE_MAX_NEW_TOKENS,
                num_sampled: int = PROBE_SAMPLES) -> dict[str, float]:
    """Raise :class:`WeightSyncMismatch` unless every server matches the reference (see module
    doc); returns ``sync/`` metrics (the largest gap over servers).  Log-probs are compared on
    the greedy decode and on ``num_sampled`` seeded temperature-1 samples.

    Collective when the trainer has several ranks: the driver rank (the only one holding
    ``servers``) probes, the probe samples go to every rank, every rank runs the reference
    forward (model-parallel), the driver compares, and a failure raises on every rank."""
    probes: list[list[Sample]] | BaseException | None = None
    if is_driver():
        try:
            probes = probe_all(servers, probe_ids, max_new_tokens=max_new_tokens,
                               num_sampled=num_sampled)
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
            probes = e
    probes = share(probes)
    if isinstance(probes, BaseException):
        if is_driver():
            raise probes
        raise RuntimeError(f"the driver rank failed the weight sync probe: {probes}")
    refs = [[reference_logprobs(smp) for smp in group] for group in probes]
    metrics, error = {}, None
    if is_driver():
        try:
            metrics = compare_probes(servers, version, probes, refs, atol=atol)
        except WeightSyncMismatch as e:
            error = e
    raise_everywhere(error)
    return share(metrics)
