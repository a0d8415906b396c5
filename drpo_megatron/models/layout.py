"""One layout check for every entry point (``drpo plan``, ``drpo submit``, ``drpo convert``, the
run config): does a TP x PP x EP (x ETP) layout divide the model and the world?

Plain ints in, :class:`LayoutError` (one line: the option, its value, what does not divide and
the fix) out; nothing here reads a config object, so each caller passes the numbers it has after
its own overrides (``--nodes``, ``--tp``...) and its own option names (``names``: ``parallel.tp``
for a config, ``--tp`` for ``drpo convert``).

Rules (Megatron-Core 0.19.2, ``parallel_state.initialize_model_parallel`` and the model):

* attention heads and KV heads divisible by TP (KV groups are split over TP);
* layers divisible by PP;
* EP > 1 only with experts, experts divisible by EP;
* the world divisible by ``tp * pp`` (attention / dense part) and by ``pp * ep * etp`` (experts);
  ``etp`` defaults to ``tp`` (Megatron's default);
* on CPU (gloo): EP > 1 together with ETP > 1 is refused -- the MoE token dispatcher then
  all-gathers variable-sized token blocks over the expert-TP group, which gloo's allgather
  rejects ("invalid tensor size"); NCCL accepts it.
"""

from __future__ import annotations

import math
from typing import Mapping

from drpo_megatron.errors import InputError


class LayoutError(InputError):
    """A layout that does not divide; the message names the option, the value and the fix."""


CONFIG_NAMES = {"tp": "parallel.tp", "pp": "parallel.pp", "ep": "parallel.ep",
                "etp": "parallel.etp", "world": "parallel.num_nodes*gpus_per_node"}
CLI_NAMES = {"tp": "--tp", "pp": "--pp", "ep": "--ep", "etp": "--etp", "world": "WORLD_SIZE"}


def effective_etp(tp: int, etp: int | None) -> int:
    """Megatron's expert tensor-parallel size: ``etp``, or ``tp`` when not given."""
    return tp if etp is None else etp


def min_world_size(tp: int, pp: int, ep: int, etp: int | None = None) -> int:
    """Smallest world Megatron accepts for the layout: divisible by tp*pp and by pp*ep*etp."""
    return pp * math.lcm(tp, ep * effective_etp(tp, etp))


def check_layout(*, tp: int, pp: int = 1, ep: int = 1, etp: int | None = None,
                 world: int | None = None, num_attention_heads: int | None = None,
                 num_key_value_heads: int | None = None, num_layers: int | None = None,
                 num_experts: int | None = None, gloo: bool = False, model: str = "the model",
                 names: Mapping[str, str] = CONFIG_NAMES) -> None:
    """Raise :class:`LayoutError` unless the layout divides.

    Architecture numbers that are ``None`` are not checked (e.g. a config without a readable
    HF config); ``world`` None: no world-size check.  ``gloo``: the run uses the gloo backend
    (CPU), which refuses EP > 1 with ETP > 1 (module doc).
    """
    n = {**CONFIG_NAMES, **names}
    for key, v in (("tp", tp), ("pp", pp), ("ep", ep)):
        if v < 1:
            raise LayoutError(f"{n[key]}={v} must be >= 1; use 1 for no {key.upper()} parallelism")
    if etp is not None and etp < 1:
        raise LayoutError(f"{n['etp']}={etp} must be >= 1 (or leave it unset for the default, tp)")
    e = effective_etp(tp, etp)
    if num_attention_heads is not None and num_attention_heads % tp:
        raise LayoutError(f"{n['tp']}={tp}: num_attention_heads={num_attention_heads} is not "
                          f"divisible by it; use a divisor of {num_attention_heads}")
    if num_key_value_heads is not None and num_key_value_heads % tp:
        raise LayoutError(f"{n['tp']}={tp}: num_key_value_heads={num_key_value_heads} is not "
                          f"divisible by it (Megatron splits KV groups over TP); use a divisor "
                          f"of {num_key_value_heads}")
    if num_layers is not None and num_layers % pp:
        raise LayoutError(f"{n['pp']}={pp}: num_hidden_layers={num_layers} is not divisible by "
                          f"it; use a divisor of {num_layers}")
    if num_experts is not None:
        if ep > 1 and not num_experts:
            raise LayoutError(f"{n['ep']}={ep}: {model} is dense (no experts); use {n['ep']} 1")
        if num_experts and num_experts % ep:
            raise LayoutError(f"{n['ep']}={ep}: num_experts={num_experts} is not divisible by "
                              f"it; use a divisor of {num_experts}")
    if gloo and ep > 1 and e > 1:
        how = f"{n['etp']}={etp}" if etp is not None else f"{n['etp']} (default {n['tp']}={tp})"
        raise LayoutError(f"{n['ep']}={ep} with {how}: expert tensor parallelism together with "
                          f"expert parallelism needs NCCL (gloo's allgather rejects the MoE "
                          f"dispatcher's variable-sized blocks); on CPU set {n['etp']} 1, or run "
                          "on GPUs")
    if world is not None:
        if world % (tp * pp):
            raise LayoutError(f"{n['tp']}={tp}, {n['pp']}={pp}: {n['world']}={world} is not "
                              f"divisible by tp*pp={tp * pp}; change tp/pp or the node count")
        if world % (pp * ep * e):
            raise LayoutError(f"{n['ep']}={ep}: {n['world']}={world} is not divisible by "
                              f"pp*ep*etp={pp * ep * e}; lower ep/etp or add nodes")


__all__ = ["LayoutError", "CONFIG_NAMES", "CLI_NAMES", "check_layout", "effective_etp",
           "min_world_size"]
