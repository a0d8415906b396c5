"""The sample: what the rollout side produces and the trainer consumes.

A neutral module (it imports nothing from the package): ``rollout/`` builds samples from SGLang's
outputs, ``training/`` packs them into micro-batches, ``mismatch/`` and the run files read them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

#: Largest expert id a uint8 route holds; models with more experts store int16 (up to 32767).
UINT8_MAX_EXPERT = 255


@dataclass(frozen=True)
class RoutedExperts:
    """The experts the rollout engine routed each token of one sample to (routing replay, R3).

    ``shape`` = (T, L, K): T = ``len(prompt_ids) + len(response_ids) - 1`` forwarded tokens
    (every token but the last sampled one, which the engine never ran through the model), L
    layers (the engine's layer index; a dense layer's rows are 0), K experts per token in the
    engine's top-K order.  Row t holds the experts of the token at position t of
    ``prompt_ids + response_ids``: the forward at position t produces the log-prob of token
    t + 1, so response token k's π is computed through row ``len(prompt_ids) - 1 + k``.

    Stored compactly as the raw bytes of a uint8 array (int16 when an expert id exceeds 255):
    L x K bytes per token (4 B for the embedded 2-layer top-2 policy, 384 B for a 48-layer top-8
    Qwen3-30B-A3B); frozen and bytes-backed, so samples compare, pickle (``dist.share``) and
    serialise (``rollouts.jsonl``: base64, 4/3 of that) without copies of numpy arrays.
    """

    data: bytes
    shape: tuple[int, int, int]
    dtype: str = "uint8"

    @classmethod
    def from_array(cls, ids: Any) -> "RoutedExperts":
        """From an integer array [T, L, K] of expert ids (>= 0)."""
        arr = np.asarray(ids)
        if arr.ndim != 3:
            raise ValueError(f"routed experts must be [tokens, layers, top_k], got shape {arr.shape}")
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"routed experts hold a negative expert id ({int(arr.min())})")
        hi = int(arr.max()) if arr.size else 0
        if hi > np.iinfo(np.int16).max:
            raise ValueError(f"expert id {hi} does not fit the int16 route format")
        dtype = "uint8" if hi <= UINT8_MAX_EXPERT else "int16"
        return cls(np.ascontiguousarray(arr, dtype=dtype).tobytes(),
                   tuple(int(d) for d in arr.shape), dtype)

    def array(self) -> np.ndarray:
        """The ids as a read-only array [T, L, K] of ``dtype``."""
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)

    @property
    def num_tokens(self) -> int:
        return self.shape[0]

    def to_json(self) -> dict[str, Any]:
        """``{"shape": [T, L, K], "dtype": ..., "b64": base64 of the bytes}``."""
        return {"shape": list(self.shape), "dtype": self.dtype,
                "b64": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RoutedExperts":
        out = cls(base64.b64decode(d["b64"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))
        if len(out.data) != int(np.prod(out.shape)) * np.dtype(out.dtype).itemsize:
            raise ValueError(f"routed experts: {len(out.data)} bytes do not hold shape "
                             f"{out.shape} of {out.dtype}")
        return out


@dataclass
class Sample:
    """One generated response.  Token lists are python ints/floats (host memory)."""

    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]  # µ: [len(response_ids)], log-prob of each sampled token
    text: str
    finish_reason: str
    weight_version: str
    answer: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    # False: the sample is excluded from the loss and its denominators (rollout.overlong: filter);
    # its reward still enters its group's advantage baseline.
    in_loss: bool = True
    # µ's top-K per response token (only when the loss needs them): [len(response_ids)][K]
    topk_ids: list[list[int]] | None = None
    topk_logp: list[list[float]] | None = None
    # the engine's experts of every forwarded token (rollout.routing_replay record / replay)
    routed_experts: RoutedExperts | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # the weight version that generated each response token (partial rollouts: a response paused
    # by a weight push continues on the new weights); None = every token is ``weight_version``
    token_versions: list[int] | None = None

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def versions(self) -> list[int]:
        """The weight version of each response token ([len(response_ids)]); raises ValueError
        when ``weight_version`` is not an integer (an engine that does not number versions)."""
        if self.token_versions is not None:
            return list(self.token_versions)
        return [int(self.weight_version)] * len(self.response_ids)

    def oldest_version(self) -> int:
        """The oldest weight version among the response tokens (the sample's staleness is
        measured from it); ``weight_version`` for an empty response."""
        return min(self.token_versions) if self.token_versions else int(self.weight_version)

    def to_state(self) -> dict[str, Any]:
        """Plain python types only (a checkpoint's ``trainer_state.pt`` is loaded with
        ``weights_only=True``): the routes as :meth:`RoutedExperts.to_json`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["routed_experts"] = None if self.routed_experts is None else self.routed_experts.to_json()
        return out

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Sample":
        """The inverse of :meth:`to_state` (fields absent from an older state keep defaults)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("routed_experts") is not None:
            kw["routed_experts"] = RoutedExperts.from_json(kw["routed_experts"])
        return cls(**kw)
