"""Typed configs for the policy losses, with validation that says what to fix.

Every loss in :data:`drpo_megatron.algorithms.POLICY_LOSSES` has one dataclass here, registered
in :data:`LOSS_CONFIGS` under the same name. Build one from a YAML mapping with
:func:`make_loss_config`; constructing a dataclass directly validates it the same way.

Fields common to every loss (:class:`BaseLossConfig`):

``anchor`` (``"rollout"`` | ``"old_policy"``, default ``"rollout"``)
    Which log-probs the trainer passes as ``rollout_logp`` (the anchor mu of every formula).
    ``"rollout"`` = the rollout engine's sampled-token log-probs, fixed for all mini-batch
    updates of a rollout step (the DRPO paper's setting). ``"old_policy"`` = log-probs recomputed
    by the training engine with the weights that generated the rollout (pi_old). The loss
    functions never look at this field: the trainer selects the tensor with
    :func:`select_anchor_logp`, so the anchor choice can never replace the chosen loss.
``monitor_delta`` (float in (0, 1], default 0.15)
    Probability-space threshold of the metric ``loss/prob_diff_gt_delta_frac`` (fraction of
    tokens with ``|pi - mu| > monitor_delta``). Default = DPPO Binary-TV's delta, so every loss
    reports how many tokens sit beyond the DPPO trust region.

Numeric fields accept ints; strings are refused (``delta: "12.5"`` is a typo, not a number; the
config loader reads ``3e-4`` as a number, as YAML 1.2 does).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from pydantic import Field, PrivateAttr, model_validator

from drpo_megatron.schema import Section

from .advantages import AdvantageEstimator
from .aggregation import AggregationMode
from .corrections import CorrectionConfig, CorrectionKind
from .kl import KLEstimator

ANCHORS = ("rollout", "old_policy")

# ---------------------------------------------------------------------------------------------
# Field constraints: each dataclass field may carry metadata {"check": <name>, "choices": (...)}
# ---------------------------------------------------------------------------------------------
_CHECKS = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "prob": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "eps_low": (lambda v: 0 <= v < 1, "must be in [0, 1) (the lower clip bound is 1 - eps_low)"),
    "nonneg": (lambda v: v >= 0, "must be >= 0"),
    "gt_one": (lambda v: v > 1, "must be > 1"),
    "pos_int": (lambda v: v >= 1, "must be an integer >= 1"),
}


def _spec(default: Any, check: str | None = None, choices: tuple | None = None, doc: str = ""):
    return field(default=default, metadata={"check": check, "choices": choices, "doc": doc})


def _fail(cls_name: str, name: str, value: Any, why: str, fix: str) -> None:
    raise ValueError(f"{cls_name}.{name} = {value!r} is invalid: {why}. Fix: {fix}")


def _coerce_and_check(obj: Any) -> None:
    """Coerce numeric strings/ints and enforce field metadata; raises ValueError."""
    cls_name = type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        default = f.default
        choices = meta.get("choices")
        if choices is not None:
            if value not in choices:
                _fail(cls_name, f.name, value, f"must be one of {list(choices)}",
                      f"set {f.name} to one of {list(choices)} (default {default!r})")
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                _fail(cls_name, f.name, value, "must be true or false",
                      f"set {f.name} to true or false (default {default})")
            continue
        if default is None and value is None:
            continue
        is_int_field = isinstance(default, int) and not isinstance(default, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail(cls_name, f.name, value, "must be a number",
                  f"set {f.name} to a number (default {default!r})")
        if isinstance(value, str):  # a quoted "12.5" is a typo or a template bug, not a number
            _fail(cls_name, f.name, value, "must be a number, not a string",
                  f"write {f.name}: {default!r} without quotes")
        if is_int_field:
            if float(value) != int(value):
                _fail(cls_name, f.name, value, "must be an integer",
                      f"set {f.name} to an integer (default {default!r})")
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            _fail(cls_name, f.name, value, "must be finite",
                  f"set {f.name} to a finite number (default {default!r})")
        check = meta.get("check")
        if check is not None:
            ok, why = _CHECKS[check]
            if not ok(value):
                _fail(cls_name, f.name, getattr(obj, f.name), why,
                      f"set {f.name} to a value that {why.replace('must be', 'is')} "
                      f"(default {default!r})")
        object.__setattr__(obj, f.name, value)


@dataclass
class BaseLossConfig:
    """Fields shared by every loss config (see the module docstring)."""

    anchor: str = _spec("rollout", choices=ANCHORS,
                        doc="which log-probs the trainer passes as rollout_logp")
    monitor_delta: float = _spec(0.15, "prob", doc="threshold of loss/prob_diff_gt_delta_frac")

    def __post_init__(self) -> None:
        _coerce_and_check(self)

    @property
    def prob_space_delta(self) -> float | None:
        """The loss's boundary on |pi - mu| in probability space (DRPO's and DPPO-TV's delta),
        or None when its delta means something else (a KL threshold, a ratio-space scale): the
        mismatch monitor then reports the DRPO default instead of misreading it."""
        return None


@dataclass
class PGISConfig(BaseLossConfig):
    """``pg_is``: unregularized importance-sampled policy gradient. No parameters."""


@dataclass
class PPOClipConfig(BaseLossConfig):
    """``ppo_clip``: PPO/GRPO clipped surrogate with clip-higher and optional dual clip.

    eps_low (0.2), eps_high (0.28, DAPO's clip-higher): ratio clip range [1-eps_low, 1+eps_high].
    dual_clip_c (None = off): for A < 0 the objective is floored at c*A (c > 1), i.e. tokens with
    r > c get zero gradient. Some references write "off" as c = 1e4; None is exact.
    """

    eps_low: float = _spec(0.2, "eps_low")
    eps_high: float = _spec(0.28, "nonneg")
    dual_clip_c: float | None = _spec(None, "gt_one")


@dataclass
class CISPOConfig(BaseLossConfig):
    """``cispo``: clipped-IS-weight policy optimization (PG with truncated, stop-grad IS weight).

    c (5.0): upper truncation of the IS weight, weight = sg(min(r, c)). There is no lower bound,
    as in CISPO's paper. Set c to 1 + eps_high for slime-style "eps_clip_high" truncation.
    """

    c: float = _spec(5.0, "positive")


@dataclass
class GSPOConfig(BaseLossConfig):
    """``gspo``: group sequence policy optimization (sequence-level ratio, clipped per sequence).

    eps_low (3e-4), eps_high (4e-4): the GSPO paper's clip range on the length-normalised
    sequence ratio. Needs ``seq_ids`` in ``extra``. Use with ``seq-mean-token-mean`` aggregation
    to get the paper's sequence objective.
    """

    eps_low: float = _spec(3e-4, "eps_low")
    eps_high: float = _spec(4e-4, "nonneg")


@dataclass
class SPOConfig(BaseLossConfig):
    """``spo``: simple policy optimization, r*A - |A|/(2 eps) * (r-1)^2.

    epsilon (12.5): the value the DRPO paper uses for its SPO baseline (equal to DRPO's delta,
    so that SPO = DRPO without mu-weighting). Small values (e.g. 0.2) give a tight trust region.
    """

    epsilon: float = _spec(12.5, "positive")


@dataclass
class DPPOTVConfig(BaseLossConfig):
    """``dppo_tv``: DPPO with the binary total-variation mask; delta (0.15)."""

    delta: float = _spec(0.15, "prob")

    prob_space_delta = property(lambda self: self.delta)


@dataclass
class DPPOKLConfig(BaseLossConfig):
    """``dppo_kl``: DPPO with the binary KL(mu||pi) mask; delta (0.05)."""

    delta: float = _spec(0.05, "positive")


@dataclass
class DPPOTopKTVConfig(BaseLossConfig):
    """``dppo_topk_tv``: DPPO with TV over the anchor's top-K tokens + sampled token + "other".

    delta (0.15); top_k (20) is how many log-probs the trainer asks the rollout engine for. The
    loss reads K from the tensors it gets (``topk_logp`` [T, K]).
    """

    delta: float = _spec(0.15, "prob")
    top_k: int = _spec(20, "pos_int")

    prob_space_delta = property(lambda self: self.delta)


@dataclass
class DPPOTopKKLConfig(BaseLossConfig):
    """``dppo_topk_kl``: DPPO with KL(mu||pi) over the top-K buckets; delta (0.05), top_k (20)."""

    delta: float = _spec(0.05, "positive")
    top_k: int = _spec(20, "pos_int")


@dataclass
class DRPOConfig(BaseLossConfig):
    """``drpo``: r*A - |A|/(2 delta) * mu * (r-1)^2.

    delta (12.5, the paper's default): weight w in [1 - 1/delta, 1 + 1/delta]; the stationary
    point pi* = mu + sign(A)*delta. mu_weighting (True): False drops the mu factor, giving SPO with
    epsilon = delta (an ablation switch).
    """

    delta: float = _spec(12.5, "positive")
    mu_weighting: bool = _spec(True)

    prob_space_delta = property(lambda self: self.delta)


@dataclass
class MaskDRPOConfig(BaseLossConfig):
    """``mask_drpo`` (ablation): DRPO's penalty applied only where DPPO-TV would mask.

    delta (12.5): strength of the DRPO penalty. mask_delta (0.15): the DPPO-TV region; the
    penalty is active only on tokens with A*(r-1) > 0 and |pi - mu| > mask_delta.
    """

    delta: float = _spec(12.5, "positive")
    mask_delta: float = _spec(0.15, "prob")

    prob_space_delta = property(lambda self: self.delta)


@dataclass
class KLPenaltyConfig(BaseLossConfig):
    """``kl_penalty`` (paper App. C): r*A - |A|/delta * phi(r).

    direction "forward" (default): phi = -log r, a per-token estimate of KL(mu||pi).
    direction "reverse": phi = r log r, a per-token estimate of KL(pi||mu).
    delta (12.5): penalty scale, the same default as DRPO so ablations compare like with like.
    """

    delta: float = _spec(12.5, "positive")
    direction: str = _spec("forward", choices=("forward", "reverse"))


@dataclass
class K3PenaltyConfig(BaseLossConfig):
    """``k3_penalty`` (App. C): phi = r - 1 - log r (k3 estimate of KL(mu||pi)); delta (12.5)."""

    delta: float = _spec(12.5, "positive")


@dataclass
class TVPenaltyConfig(BaseLossConfig):
    """``tv_penalty`` (App. C): phi = |r - 1| (per-token TV estimate); delta (12.5)."""

    delta: float = _spec(12.5, "positive")


LOSS_CONFIGS: dict[str, type] = {
    "pg_is": PGISConfig,
    "ppo_clip": PPOClipConfig,
    "cispo": CISPOConfig,
    "gspo": GSPOConfig,
    "spo": SPOConfig,
    "dppo_tv": DPPOTVConfig,
    "dppo_kl": DPPOKLConfig,
    "dppo_topk_tv": DPPOTopKTVConfig,
    "dppo_topk_kl": DPPOTopKKLConfig,
    "drpo": DRPOConfig,
    "mask_drpo": MaskDRPOConfig,
    "kl_penalty": KLPenaltyConfig,
    "k3_penalty": K3PenaltyConfig,
    "tv_penalty": TVPenaltyConfig,
}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def make_loss_config(name: str, params: Mapping[str, Any] | None = None):
    """Build and validate the config of loss ``name`` from a (YAML) mapping.

    Raises ValueError naming the field, the value and the fix for an unknown loss name, an
    unknown key, or an out-of-range / wrongly typed value. ``params=None`` gives the defaults.
    """
    if name not in LOSS_CONFIGS:
        raise ValueError(
            f"unknown policy loss {name!r}: {_suggest(name, LOSS_CONFIGS)}"
            f"Fix: choose one of {sorted(LOSS_CONFIGS)}")
    cls = LOSS_CONFIGS[name]
    params = dict(params or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in known:
            raise ValueError(
                f"{cls.__name__}: unknown key {key!r} (value {value!r}) for loss {name!r}: "
                f"{_suggest(key, known)}Fix: use only {sorted(known)}")
    return cls(**params)


def resolve_loss_config(name: str, cfg) -> BaseLossConfig:
    """Return ``cfg`` checked to be the config class of ``name``; None gives the defaults."""
    cls = LOSS_CONFIGS[name]
    if cfg is None:
        return cls()
    if isinstance(cfg, Mapping):
        return make_loss_config(name, cfg)
    if type(cfg) is not cls:
        raise TypeError(f"loss {name!r} expects a {cls.__name__}, got {type(cfg).__name__}; "
                        f"build it with make_loss_config({name!r}, params)")
    return cfg


def select_anchor_logp(cfg: BaseLossConfig, rollout_logp: torch.Tensor,
                       old_policy_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Return the anchor log-probs that the trainer must pass as the loss's ``rollout_logp``.

    ``cfg.anchor == "rollout"``: the rollout engine's log-probs (``rollout_logp``).
    ``cfg.anchor == "old_policy"``: the recomputed pi_old log-probs; raises ValueError if they
    were not computed (the anchor is never silently swapped). The result is detached.
    """
    if cfg.anchor == "rollout":
        return rollout_logp.detach()
    if old_policy_logp is None:
        raise ValueError(
            f"{type(cfg).__name__}.anchor = 'old_policy' but no recomputed old-policy log-probs "
            "were given. Fix: recompute pi_old log-probs before the update, or set anchor: rollout")
    return old_policy_logp.detach()


# ---------------------------------------------------------------------------------------------
# Loop options around the policy loss: reference-model KL (loss.kl) and the off-policy correction
# (loss.correction); applied by :func:`drpo_megatron.algorithms.loss_terms.add_loss_terms`.
# ---------------------------------------------------------------------------------------------
class KLConfig(Section):
    """``loss.kl``: a KL penalty to a frozen reference policy (off when ``coef`` is 0)."""

    coef: float = Field(default=0.0, ge=0)
    """beta; 0 = off (no reference model is built)."""
    estimator: KLEstimator = "k3"
    """k1 | k2 | k3 | low_var_kl (algorithms/kl.py)."""
    in_reward: bool = False
    """false: beta * KL_t is added to every token's loss (its gradient flows; one extra reference
    forward per step's samples); true: beta * sum_t KL_t(mu || ref) over the response is
    subtracted from the sample's reward before the advantages (no gradient; mu = the rollout
    log-probs the tokens were sampled with)."""
    ref_path: str = ""
    """HF checkpoint of the reference; "" = the initial policy (model.hf_path, or the embedded
    tiny checkpoint), built with the actor's Megatron layout and dtype."""

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    @property
    def in_loss(self) -> bool:
        return self.enabled and not self.in_reward


class CorrectionSection(Section):
    """``loss.correction``: the off-policy correction's kind and bounds, resolved at load to the
    library's :class:`~drpo_megatron.algorithms.corrections.CorrectionConfig` (``config``), whose
    defaults fill the bounds of each kind."""

    kind: CorrectionKind = "none"
    """none | tis | mis | icepop | seq_tis | seq_mis | geo_mis (algorithms/corrections.py)."""
    low: float | None = Field(default=None, gt=0)
    """Lower bound of the band (banded kinds); null = the kind's default."""
    high: float | None = Field(default=None, gt=0)
    """Upper bound (truncation or band); null = the kind's default."""
    reject_only: bool = False
    """mis / icepop / seq_mis: 1 instead of rho inside the band (pure rejection)."""

    _config: CorrectionConfig | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self) -> "CorrectionSection":
        try:
            self._config = CorrectionConfig(kind=self.kind, low=self.low, high=self.high,
                                            reject_only=self.reject_only)
        except (ValueError, TypeError) as e:
            raise ValueError(f"loss.correction: {e}") from None
        return self

    @property
    def config(self) -> CorrectionConfig:
        return self._config


def check_loss_options(correction, anchor: str) -> None:
    """A reweighting correction (tis, seq_tis, mis / icepop / seq_mis without reject_only) needs
    the old_policy anchor: with the rollout anchor the loss ratio pi/mu already is the importance
    weight (see :mod:`~drpo_megatron.algorithms.corrections`).  Raises ValueError naming the
    fields and the fix, before any process starts."""
    if correction.kind != "none" and correction.reweights and anchor != "old_policy":
        raise ValueError(
            f"loss.correction.kind={correction.kind!r} reweights tokens by rho = pi_old/mu, but "
            f"loss.params.anchor={anchor!r}: the loss ratio pi/mu is already that importance "
            "weight, the correction would count it twice. Fix: set loss.params.anchor: old_policy "
            "(ratio pi/pi_old, the decoupled objective), or use a rejection-only correction "
            "(geo_mis, or mis / icepop / seq_mis with reject_only: true)")


# ---------------------------------------------------------------------------------------------
# The run config's ``loss:`` section
# ---------------------------------------------------------------------------------------------
class LossSection(Section):
    """``name`` picks the policy loss from :data:`drpo_megatron.algorithms.POLICY_LOSSES`;
    ``params`` are that loss's typed config fields (e.g. ``{delta: 12.5}`` for DRPO), resolved
    once, at load, to :attr:`policy` (the loss's dataclass, validated)."""

    name: str = "drpo"
    """Policy loss: drpo, pg_is, ppo_clip, cispo, gspo, spo, dppo_tv, dppo_kl, dppo_topk_tv,
    dppo_topk_kl, mask_drpo, kl_penalty, k3_penalty, tv_penalty (docs/losses.md)."""
    params: dict[str, Any] = Field(default_factory=lambda: {"delta": 12.5})
    """Fields of the loss's typed config (algorithms/config.py), e.g. {delta: 12.5} for DRPO,
    {eps_low: 0.2, eps_high: 0.28} for ppo_clip, plus anchor: rollout | old_policy."""
    aggregation: AggregationMode = "seq-mean-token-sum-norm"
    """How per-token losses become the step loss (denominators global over the step)."""
    horizon: int = Field(default=16, gt=0)
    """Constant horizon H of seq-mean-token-sum-norm (the paper: max response length 8192)."""
    advantage: AdvantageEstimator = "dr_grpo"
    """Group advantage estimator: dr_grpo (mean subtracted, the paper's), grpo (/ std), rloo."""
    kl: KLConfig = Field(default_factory=lambda: KLConfig())
    """KL penalty to a frozen reference policy (off by default; docs/losses.md)."""
    correction: CorrectionSection = Field(default_factory=lambda: CorrectionSection())
    """Off-policy correction composed with the loss (tis, mis, icepop, seq_tis, seq_mis,
    geo_mis; off by default; docs/losses.md)."""

    _policy: BaseLossConfig | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self) -> "LossSection":
        try:
            self._policy = make_loss_config(self.name, self.params)
            check_loss_options(self.correction.config, self._policy.anchor)
        except (ValueError, TypeError) as e:
            raise ValueError(f"loss: {e}") from None
        return self

    @property
    def policy(self) -> BaseLossConfig:
        """The loss's typed config (``LOSS_CONFIGS[name]`` built from ``params``)."""
        return self._policy
