"""Routing replay (R3), engine side: the experts SGLang routed each token to, per sample.

With ``rollout.routing_replay`` other than ``off`` the servers we launch get
``--enable-return-routed-experts`` (:data:`SERVER_FLAG`) and every training ``/generate`` request
carries ``return_routed_experts: true``.  SGLang 0.5.23 then answers, per output,
``meta_info.routed_experts``: base64 of a little-endian int32 array [T, L, K] flattened, T =
``prompt + response - 1`` tokens (rows ``[0, seqlen - 1)`` of the request, read from a host
buffer indexed by KV-cache slot, so prompt tokens served from the prefix cache carry the routes
computed when they were prefilled), L = the model's ``num_hidden_layers``, K =
``num_experts_per_tok``, in the engine's top-K order.

SGLang's own decoder is ``sglang.srt.state_capturer.routed_experts.
extract_routed_experts_from_meta_info`` (``np.frombuffer(b64decode(...), int32)``, flat); it is
not imported here because importing it loads SGLang's server stack into the trainer (16 s and
~5,000 modules on the CPU machine).  :func:`decode_routed_experts` reads the same format and
``tests/rollout/test_routes.py`` checks it against SGLang's decoder on a real server's output.

sglang-router 0.3.2 drops the field (tested with real servers: the request through the router
returns no ``routed_experts``), so routing replay is refused behind it at start-up
(:func:`check_routing_replay_front`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drpo_megatron.errors import RuntimeFailure
from drpo_megatron.samples import RoutedExperts

#: sglang.launch_server flag that makes the server keep every token's routed experts
SERVER_FLAG = "--enable-return-routed-experts"
#: the /generate request field and the meta_info key of the answer
REQUEST_FIELD = "return_routed_experts"
META_KEY = "routed_experts"
#: SGLang's wire format: int32 expert ids
WIRE_DTYPE = np.dtype("<i4")


class RoutesError(RuntimeFailure):
    """A /generate output's routed experts are missing or malformed."""


#: config.json names of the routed-expert count (Qwen3-MoE as written by transformers 4 / 5,
#: DeepSeek-style models)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class RouteSpec:
    """What the routes of the policy look like: ``num_layers`` (the engine's layer dimension,
    HF ``num_hidden_layers``), ``top_k`` (``num_experts_per_tok``) and ``num_experts``."""

    num_layers: int
    top_k: int
    num_experts: int

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "RouteSpec | None":
        """From an HF ``config.json`` mapping; None for a dense model (no routed experts)."""
        text = cfg.get("text_config") or cfg
        experts = next((text[k] for k in EXPERT_COUNT_KEYS if text.get(k)), None)
        top_k = text.get("num_experts_per_tok")
        if not experts or not top_k:
            return None
        return cls(int(text["num_hidden_layers"]), int(top_k), int(experts))


def route_spec(mode: str, policy_dir: str | Path) -> RouteSpec | None:
    """The route shape the rollout must return for ``rollout.routing_replay=mode`` (None when
    off), from the policy's ``config.json``; a ValueError for a dense policy."""
    if mode == "off":
        return None
    spec = RouteSpec.from_hf_config(json.loads((Path(policy_dir) / "config.json").read_text()))
    if spec is None:
        raise ValueError(f"rollout.routing_replay={mode!r}: the policy {policy_dir} is not a "
                         "Mixture-of-Experts model (no expert count or num_experts_per_tok in "
                         "its config.json); set rollout.routing_replay: off")
    return spec


def decode_routed_experts(meta: dict[str, Any], *, num_tokens: int, spec: RouteSpec,
                          where: str) -> RoutedExperts:
    """``meta_info.routed_experts`` of one output -> :class:`RoutedExperts` [T, L, K] in the
    compact dtype.  ``num_tokens`` = T expected (``len(prompt) + len(response) - 1``).

    Raises :class:`RoutesError` naming ``where`` when the field is missing (the server was not
    started with --enable-return-routed-experts, or a router dropped it), is not base64 of
    int32, has the wrong number of rows, or holds an expert id outside ``[0, num_experts)``."""
    raw = meta.get(META_KEY)
    if raw is None:
        raise RoutesError(
            f"{where} lacks meta_info.{META_KEY}: the server must run with {SERVER_FLAG} and the "
            f"request ask for {REQUEST_FIELD}; sglang-router 0.3.2 drops the field (use "
            "rollout.router: client with several servers)")
    if not isinstance(raw, str):
        raise RoutesError(f"{where}: meta_info.{META_KEY} is {type(raw).__name__}, expected the "
                          "base64 string SGLang 0.5.23 sends")
    try:
        buf = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RoutesError(f"{where}: meta_info.{META_KEY} is not base64 ({e})") from None
    per_token = spec.num_layers * spec.top_k
    if len(buf) % WIRE_DTYPE.itemsize or len(buf) // WIRE_DTYPE.itemsize != num_tokens * per_token:
        raise RoutesError(
            f"{where}: meta_info.{META_KEY} holds {len(buf)} bytes, expected {num_tokens} tokens x "
            f"{spec.num_layers} layers x top-{spec.top_k} x 4 B = {num_tokens * per_token * 4} "
            "(prompt + response - 1 forwarded tokens)")
    ids = np.frombuffer(buf, dtype=WIRE_DTYPE).reshape(num_tokens, spec.num_layers, spec.top_k)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_experts):
        raise RoutesError(f"{where}: meta_info.{META_KEY} holds expert ids in [{int(ids.min())}, "
                          f"{int(ids.max())}], outside [0, {spec.num_experts})")
    return RoutedExperts.from_array(ids)


def routes_bytes_per_token(spec: RouteSpec) -> dict[str, float]:
    """Bytes one token's routes take: in memory / pickles (uint8, or int16 beyond 255 experts),
    in ``rollouts.jsonl`` (base64) and on SGLang's wire (base64 of int32)."""
    item = 1 if spec.num_experts - 1 <= 255 else 2
    raw = spec.num_layers * spec.top_k * item
    return {"stored": float(raw), "jsonl": raw * 4 / 3,
            "wire": spec.num_layers * spec.top_k * WIRE_DTYPE.itemsize * 4 / 3}


def check_routing_replay_front(mode: str, *, num_servers: int, router: str,
                               router_url: str | None, router_url_from: str = "") -> None:
    """Refuse routing replay behind sglang-router (it drops the routed experts): a ValueError
    naming the setting and the alternative, before anything starts."""
    if mode == "off":
        return
    if router_url:
        raise ValueError(
            f"rollout.routing_replay={mode!r} with an external sglang-router ({router_url_from}="
            f"{router_url}): sglang-router 0.3.2 drops the routed experts SGLang returns, so the "
            "trainer would never see them; let drpo launch the servers with the client-side fleet "
            "(unset the router URL, rollout.router: client) or set rollout.routing_replay: off")
    if num_servers > 1 and router == "sglang-router":
        raise ValueError(
            f"rollout.routing_replay={mode!r} with rollout.num_servers={num_servers} behind "
            "rollout.router='sglang-router': sglang-router 0.3.2 drops the routed experts SGLang "
            "returns; use the client-side fleet (rollout.router: client), which sends each request "
            "to a server directly, or set rollout.routing_replay: off")
