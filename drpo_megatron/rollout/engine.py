"""Rollout generation: prompt groups -> SGLang -> samples with per-token rollout log-probs µ.

A *group* is the ``n`` samples of one prompt (GRPO-style advantages are computed within it).
SGLang returns, for each sample, the generated token ids and ``meta_info.output_token_logprobs``
= ``[[logprob, token_id, text|None], ...]``: the log-probability of each sampled token under the
engine's sampling distribution (logits / temperature).  These are the anchor µ of the loss.

Losses that need the engine's top-K distribution (``LOSS_EXTRAS[name]`` has ``topk_logp``: DPPO
top-K) request ``top_logprobs_num = K``; SGLang 0.5.23 then returns
``meta_info.output_top_logprobs`` = per generated position a list of K ``[logprob, token_id,
text|None]`` sorted by log-prob (same tempered distribution as ``output_token_logprobs``; checked
on a real server).  K must not exceed the vocabulary: SGLang's scheduler dies on it.

With routing replay (``rollout.routing_replay`` record / replay) the requests also ask for
``return_routed_experts`` and each sample carries the engine's experts of every forwarded token
(``Sample.routed_experts``, decoded by :mod:`drpo_megatron.rollout.routes`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

from drpo_megatron.rollout.routes import RouteSpec, decode_routed_experts
from drpo_megatron.rollout.server import SGLangServer, ServerError
from drpo_megatron.samples import Sample

#: meta_info key of a joined partial-rollout output (rollout/partial.py): the weight version of
#: each output token (SGLang never sends it; an output without it came from one version)
TOKEN_VERSIONS_KEY = "drpo_token_versions"


def parse_sample(out: Any, *, group_id: int, prompt_ids: list[int], answer: str,
                 server_name: str, top_k: int = 0, routes: RouteSpec | None = None) -> Sample:
    """Validate one ``/generate`` output and turn it into a :class:`Sample`.

    ``top_k`` > 0: also parse ``meta_info.output_top_logprobs`` (K entries per response token).
    ``routes``: also decode ``meta_info.routed_experts`` (routing replay; not for an aborted
    output, which is re-issued anyway).

    Raises :class:`ServerError` naming what is missing or inconsistent (a truncated or malformed
    response must never reach the loss silently).
    """
    where = f"{server_name}: /generate output for group {group_id}"
    if not isinstance(out, dict):
        raise ServerError(f"{where} is {type(out).__name__}, expected a JSON object")
    meta = out.get("meta_info")
    ids = out.get("output_ids")
    if not isinstance(meta, dict) or not isinstance(ids, list):
        raise ServerError(f"{where} lacks 'output_ids' or 'meta_info' (keys: {sorted(out)})")
    lps = meta.get("output_token_logprobs")
    if not isinstance(lps, list):
        raise ServerError(f"{where} lacks meta_info.output_token_logprobs; was return_logprob set?")
    if len(lps) != len(ids):
        raise ServerError(f"{where} has {len(ids)} output_ids but {len(lps)} log-probs (truncated "
                          "response)")
    logp: list[float] = []
    for i, (entry, tok) in enumerate(zip(lps, ids)):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or entry[1] != tok:
            raise ServerError(f"{where}: log-prob entry {i} {entry!r} does not match token {tok}")
        v = entry[0]
        logp.append(float("nan") if v is None else float(v))  # non-finite: dropped by the loss
    topk_ids = topk_logp = None
    if top_k:
        topk_ids, topk_logp = _parse_top_logprobs(meta.get("output_top_logprobs"), len(ids), top_k,
                                                  where)
    finish = meta.get("finish_reason") or {}
    finish_type = str(finish.get("type", "unknown")) if isinstance(finish, dict) else str(finish)
    versions = meta.get(TOKEN_VERSIONS_KEY)
    if versions is not None and len(versions) != len(ids):
        raise ServerError(f"{where} has {len(ids)} output_ids but {len(versions)} token versions")
    routed = None
    if routes is not None and finish_type != "abort":
        routed = decode_routed_experts(meta, num_tokens=len(prompt_ids) + len(ids) - 1,
                                       spec=routes, where=where)
    return Sample(
        group_id=group_id,
        prompt_ids=list(prompt_ids),
        response_ids=[int(t) for t in ids],
        rollout_logp=logp,
        text=str(out.get("text", "")),
        finish_reason=finish_type,
        weight_version=str(meta.get("weight_version", "")),
        answer=answer,
        topk_ids=topk_ids,
        topk_logp=topk_logp,
        routed_experts=routed,
        token_versions=None if versions is None else [int(v) for v in versions],
    )


def _parse_top_logprobs(top: Any, n_tokens: int, k: int, where: str):
    if not isinstance(top, list):
        raise ServerError(f"{where} lacks meta_info.output_top_logprobs; was top_logprobs_num={k} "
                          "sent with return_logprob?")
    if len(top) != n_tokens:
        raise ServerError(f"{where} has {n_tokens} output_ids but {len(top)} top-K log-prob "
                          "positions (truncated response)")
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for i, row in enumerate(top):
        if not isinstance(row, list) or len(row) != k:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise ServerError(f"{where}: top-K log-probs at position {i} hold {got} entries, "
                              f"expected top_logprobs_num={k}")
        row_ids, row_lps = [], []
        for entry in row:
            if (not isinstance(entry, (list, tuple)) or len(entry) < 2
                    or not isinstance(entry[1], int) or isinstance(entry[1], bool) or entry[1] < 0
                    or not (entry[0] is None or isinstance(entry[0], (int, float)))):
                raise ServerError(f"{where}: top-K log-prob entry {entry!r} at position {i} is not "
                                  "[logprob, token_id, text]")
            row_ids.append(int(entry[1]))
            row_lps.append(float("nan") if entry[0] is None else float(entry[0]))
        ids.append(row_ids)
        lps.append(row_lps)
    return ids, lps


def generate_groups(server: SGLangServer, prompts: Sequence[list[int]], answers: Sequence[str], *,
                    n: int, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int | None = None, first_group_id: int = 0,
                    top_k: int = 0, routes: RouteSpec | None = None) -> list[Sample]:
    """Generate ``n`` samples for each prompt; returns ``len(prompts) * n`` samples, group-major.

    ``top_k`` > 0 also requests and validates µ's top-K log-probs per response token;
    ``routes`` the engine's routed experts (routing replay)."""
    params: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p,
                              "max_new_tokens": max_new_tokens}
    if seed is not None:
        params["sampling_seed"] = seed
    outs = server.generate([list(p) for p in prompts], params, return_logprob=True,
                           top_logprobs_num=top_k, **_routes_kw(routes))
    expected = len(prompts) * n
    if len(outs) != expected:
        raise ServerError(f"{server.name}: /generate returned {len(outs)} outputs for "
                          f"{len(prompts)} prompts x n={n} (expected {expected})")
    samples = []
    for i, out in enumerate(outs):
        g = i // n
        samples.append(parse_sample(out, group_id=first_group_id + g, prompt_ids=prompts[g],
                                    answer=answers[g], server_name=server.name, top_k=top_k,
                                    routes=routes))
    return samples


def _routes_kw(routes: RouteSpec | None) -> dict[str, Any]:
    """The front's ``return_routed_experts`` keyword, only when asked (fronts without routing
    replay keep their plain signature)."""
    return {} if routes is None else {"return_routed_experts": True}


def rollout_metrics(samples: Sequence[Sample], current_version: str | None = None) -> dict[str, float]:
    """``rollout/`` metrics of one step (rewards, lengths, finish reasons, staleness)."""
    n = max(len(samples), 1)
    rewards = [s.reward for s in samples]
    lengths = [s.num_response_tokens for s in samples]
    groups: dict[int, list[float]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s.reward)
    solved_all = sum(1 for g in groups.values() if min(g) == max(g))
    out = {
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/response_len_mean": sum(lengths) / n,
        "rollout/response_len_max": float(max(lengths, default=0)),
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        "rollout/num_samples": float(len(samples)),
        "rollout/num_tokens": float(sum(lengths)),
        "rollout/zero_std_group_frac": solved_all / max(len(groups), 1),
        "rollout/nonfinite_logprob_tokens": float(sum(
            sum(1 for v in s.rollout_logp if not math.isfinite(v)) for s in samples)),
    }
    with_topk = [s for s in samples if s.topk_ids is not None]
    if with_topk:  # DPPO top-K: how often y_t is among µ's top-K (else it gets its own bucket)
        hits = sum(t in row for s in with_topk for t, row in zip(s.response_ids, s.topk_ids))
        out["rollout/sampled_in_topk_frac"] = hits / max(
            sum(s.num_response_tokens for s in with_topk), 1)
    if current_version is not None:
        try:
            cur = int(current_version)
            stale = [cur - int(s.weight_version) for s in samples]
            out["rollout/staleness"] = sum(stale) / n
        except ValueError:
            pass
    return out


def sampling_seed(seed: int, step: int, group: int, sample: int) -> int:
    """SGLang ``sampling_seed`` of one sample: a 31-bit hash of (train.seed, step, prompt index
    in the step, sample index in the group); distinct per sample, identical across restarts."""
    digest = hashlib.sha256(f"{seed}:{step}:{group}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded_generate_groups(server, prompts, answers, *, n: int, temperature: float, top_p: float,
                           max_new_tokens: int, seed: int, step: int, first_group: int = 0,
                           top_k: int = 0, routes: RouteSpec | None = None) -> list[Sample]:
    """Like ``generate_groups`` (group-major, ``len(prompts) * n`` samples) with one request
    per sample, each with its own ``sampling_seed``: SGLang seeds a request's sampling by
    (seed, position), so the n samples of a prompt must not share one seed (they would be
    identical).  ``first_group``: step-local index of ``prompts[0]`` (its group id and seed
    index); ``top_k`` > 0 also requests µ's top-K log-probs, ``routes`` the routed experts."""
    ids, params = [], []
    for g, p in enumerate(prompts):
        for k in range(n):
            ids.append(list(p))
            params.append({"n": 1, "temperature": temperature, "top_p": top_p,
                           "max_new_tokens": max_new_tokens,
                           "sampling_seed": sampling_seed(seed, step, first_group + g, k)})
    outs = server.generate(ids, params, return_logprob=True, top_logprobs_num=top_k,
                           **_routes_kw(routes))
    if len(outs) != len(ids):
        raise ServerError(f"{server.name}: /generate returned {len(outs)} outputs for "
                          f"{len(ids)} seeded requests")
    return [parse_sample(out, group_id=first_group + i // n, prompt_ids=prompts[i // n],
                         answer=answers[i // n], server_name=server.name, top_k=top_k,
                         routes=routes)
            for i, out in enumerate(outs)]
