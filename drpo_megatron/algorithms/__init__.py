"""Policy-loss library (pure torch; never imports megatron or sglang).

Public API:
  POLICY_LOSSES[name](logp, rollout_logp, advantages, mask, cfg=None, **extra)
      -> (per_token_loss [T] fp32, metrics dict)               see ``losses``
  LOSS_CONFIGS[name] (dataclass), make_loss_config(name, params), select_anchor_logp(...)
  LOSS_EXTRAS[name]  extras a loss needs (gspo: seq_ids; top-K DPPO: topk_logp, ...)
  aggregate_loss(per_token_loss, mask, mode, *, seq_ids, global_num_tokens, global_num_seqs,
                 horizon) -> scalar                             see ``aggregation``
  CorrectionConfig, apply_off_policy_correction, compute_correction_weights   ``corrections``
  compute_advantages(rewards, group_size, estimator, eps)        ``advantages``
  kl_estimate(logp, ref_logp, kind)                              ``kl``
  KLConfig, add_loss_terms (loss.kl / loss.correction in the loop)  ``config``, ``loss_terms``
  reduce_metrics(list_of_metric_dicts)                           ``_common``
"""

from ._common import LOG_RATIO_CLAMP, reduce_metrics
from .advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from .aggregation import AGGREGATION_MODES, aggregate_loss, count_sequences
from .config import (ANCHORS, LOSS_CONFIGS, BaseLossConfig, CISPOConfig, DPPOKLConfig,
                     DPPOTopKKLConfig, DPPOTopKTVConfig, DPPOTVConfig, DRPOConfig, GSPOConfig,
                     K3PenaltyConfig, KLPenaltyConfig, MaskDRPOConfig, PGISConfig, PPOClipConfig,
                     KLConfig, SPOConfig, TVPenaltyConfig, check_loss_options, make_loss_config,
                     select_anchor_logp)
from .corrections import (CORRECTION_KINDS, CorrectionConfig, apply_off_policy_correction,
                          compute_correction_weights, make_correction_config)
from .kl import KL_ESTIMATORS, kl_estimate
from .loss_terms import add_loss_terms, kl_reward_penalty
from .losses import LOSS_EXTRAS, POLICY_LOSSES, get_policy_loss

__all__ = [
    "POLICY_LOSSES", "LOSS_CONFIGS", "LOSS_EXTRAS", "get_policy_loss", "make_loss_config",
    "select_anchor_logp", "ANCHORS", "BaseLossConfig", "PGISConfig", "PPOClipConfig",
    "CISPOConfig", "GSPOConfig", "SPOConfig", "DPPOTVConfig", "DPPOKLConfig",
    "DPPOTopKTVConfig", "DPPOTopKKLConfig", "DRPOConfig", "MaskDRPOConfig", "KLPenaltyConfig",
    "K3PenaltyConfig", "TVPenaltyConfig",
    "aggregate_loss", "count_sequences", "AGGREGATION_MODES",
    "CorrectionConfig", "CORRECTION_KINDS", "make_correction_config",
    "apply_off_policy_correction", "compute_correction_weights",
    "compute_advantages", "ADVANTAGE_ESTIMATORS", "kl_estimate", "KL_ESTIMATORS",
    "reduce_metrics", "LOG_RATIO_CLAMP", "KLConfig", "check_loss_options", "add_loss_terms",
    "kl_reward_penalty",
]
