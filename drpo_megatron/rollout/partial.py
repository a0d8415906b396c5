"""Partial rollouts (``rollout.partial_rollouts``, asynchronous mode): a response that a weight
push interrupts continues on the new weights instead of being thrown away.

A push pauses every server with ``/pause_generation`` mode ``abort`` (weights/sync.py): each
in-flight request comes back with ``finish_reason.type == "abort"``, the tokens generated so far
and their log-probs under the weights that generated them (``meta_info.weight_version``, the old
version: the new weights load only after the pause).  :class:`PartialFront` keeps that segment and
sends ``prompt + partial response`` again as a new request for the tokens still allowed
(``max_new_tokens`` minus those generated, same sampling params and seed).  The request waits in
the paused server and runs on the new weights.  When the response finishes, the segments are
joined into one output in SGLang's shape:

* ``output_ids`` / ``meta_info.output_token_logprobs`` (/ ``output_top_logprobs``): the
  segments' concatenated, so µ of each token is its log-prob under the version that sampled it;
* ``meta_info[TOKEN_VERSIONS_KEY]``: the version of each token (non-decreasing; it changes only
  where a push cut the response) -> ``Sample.token_versions``;
* ``text``: the segments' texts concatenated; ``weight_version``, ``finish_reason`` and (routing
  replay) ``routed_experts``: the last segment's.  The last request prefilled the whole prefix on
  the newest weights, so its routes cover every forwarded token, from that version.

Responses no push interrupted are returned untouched (no ``TOKEN_VERSIONS_KEY``).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from drpo_megatron.rollout.engine import TOKEN_VERSIONS_KEY
from drpo_megatron.rollout.server import ServerError, is_aborted

#: continuations of one response before giving up: each one needs a weight push to cut it, so
#: more than this means pushes come faster than the server can make any progress
MAX_SEGMENTS = 32


class _Segments:
    """The tokens of one response gathered so far over its aborted segments."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[Any] = []
        self.top: list[Any] | None = None
        self.versions: list[int] = []
        self.text = ""

    def add(self, out: dict[str, Any]) -> None:
        meta = out.get("meta_info") or {}
        ids = [int(t) for t in out.get("output_ids") or []]
        lps = list(meta.get("output_token_logprobs") or [])
        if len(lps) != len(ids):
            raise ServerError(f"an aborted /generate output has {len(ids)} output_ids but "
                              f"{len(lps)} log-probs: cannot continue it (partial rollouts)")
        self.ids += ids
        self.logprobs += lps
        if meta.get("output_top_logprobs") is not None:
            self.top = (self.top or []) + list(meta["output_top_logprobs"])
        self.versions += [_version(meta)] * len(ids)
        self.text += str(out.get("text", ""))

    def join(self, last: dict[str, Any]) -> dict[str, Any]:
        """``last`` (the finishing segment) with every earlier segment's tokens in front."""
        out = copy.copy(last)
        meta = dict(last.get("meta_info") or {})
        ids = [int(t) for t in last.get("output_ids") or []]
        out["output_ids"] = self.ids + ids
        out["text"] = self.text + str(last.get("text", ""))
        meta["output_token_logprobs"] = self.logprobs + list(meta.get("output_token_logprobs") or [])
        if meta.get("output_top_logprobs") is not None:
            meta["output_top_logprobs"] = (self.top or []) + list(meta["output_top_logprobs"])
        meta[TOKEN_VERSIONS_KEY] = self.versions + [_version(meta)] * len(ids)
        meta["completion_tokens"] = len(out["output_ids"])
        out["meta_info"] = meta
        return out


def _version(meta: dict[str, Any]) -> int:
    v = meta.get("weight_version")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ServerError(f"partial rollouts need integer weight versions from the server, got "
                          f"{v!r}") from None


class PartialFront:
    """Wraps a front (one server, a Fleet or a RouterFleet: their ``generate`` with
    ``keep_aborted``) so that responses cut by a weight push are continued, not regenerated."""

    def __init__(self, front: Any, *, max_segments: int = MAX_SEGMENTS):
        self.front = front
        self.max_segments = max_segments
        self.continued = 0  # continuation requests sent (a metric for tests and logs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.front, name)

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any] | list, *,
                 return_logprob: bool = True, top_logprobs_num: int = 0,
                 return_routed_experts: bool = False) -> list[dict]:
        """The front's ``generate`` (outputs prompt-major, ``n`` per prompt), each aborted output
        continued until it finishes; see the module docstring."""
        if not return_logprob:
            raise ValueError("partial rollouts join per-token log-probs: return_logprob must be on")
        params = (list(sampling_params) if isinstance(sampling_params, list)
                  else [sampling_params] * len(input_ids))
        owner = [i for i, p in enumerate(params) for _ in range(int(p.get("n", 1) or 1))]
        kw = {"return_logprob": True, "top_logprobs_num": top_logprobs_num,
              "return_routed_experts": return_routed_experts, "keep_aborted": True}
        final = list(self.front.generate(input_ids, sampling_params, **kw))
        if len(final) != len(owner):
            raise ServerError(f"/generate returned {len(final)} outputs for {len(owner)} samples")
        acc: dict[int, _Segments] = {}
        pending = [j for j, o in enumerate(final) if is_aborted(o)]
        rounds = 0
        while pending:
            rounds += 1
            if rounds > self.max_segments:
                raise ServerError(f"{len(pending)} responses were cut by weight pushes "
                                  f"{self.max_segments} times (partial rollouts): pushes come "
                                  "faster than the servers generate")
            cont_ids, cont_params, who = [], [], []
            for j in pending:
                seg = acc.setdefault(j, _Segments())
                seg.add(final[j])
                p = dict(params[owner[j]])
                left = int(p.get("max_new_tokens", 0)) - len(seg.ids)
                if left <= 0:  # cut exactly at the length limit: finished as "length"
                    meta = {**(final[j].get("meta_info") or {}), "output_token_logprobs": [],
                            "finish_reason": {"type": "length", "length": len(seg.ids)}}
                    if meta.get("output_top_logprobs") is not None:
                        meta["output_top_logprobs"] = []
                    final[j] = seg.join({"output_ids": [], "text": "", "meta_info": meta})
                    continue
                p["n"], p["max_new_tokens"] = 1, left
                cont_ids.append(list(input_ids[owner[j]]) + seg.ids)
                cont_params.append(p)
                who.append(j)
            pending = []
            if not who:
                break
            self.continued += len(who)
            outs = self.front.generate(cont_ids, cont_params, **kw)
            if len(outs) != len(who):
                raise ServerError(f"/generate returned {len(outs)} outputs for {len(who)} "
                                  "continued responses")
            for j, o in zip(who, outs):
                final[j] = o
                if is_aborted(o):
                    pending.append(j)
                else:
                    final[j] = acc[j].join(o)
        return final


def version_boundaries(versions: Sequence[int]) -> list[int]:
    """Token positions where the weight version changes (``versions[k] != versions[k - 1]``)."""
    return [k for k in range(1, len(versions)) if versions[k] != versions[k - 1]]
