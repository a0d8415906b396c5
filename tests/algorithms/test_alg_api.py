"""Configs, registry, anchors, extras, advantages/KL properties, non-finite handling, purity."""

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

import drpo_megatron.algorithms
from drpo_megatron.algorithms import (LOSS_CONFIGS, LOSS_EXTRAS, POLICY_LOSSES, DRPOConfig,
                                      compute_advantages, get_policy_loss, kl_estimate,
                                      make_loss_config, select_anchor_logp)


def test_registry_and_configs_agree():
    assert set(POLICY_LOSSES) == set(LOSS_CONFIGS) == set(LOSS_EXTRAS)
    for name, cls in LOSS_CONFIGS.items():
        cfg = make_loss_config(name, {})
        assert isinstance(cfg, cls) and cfg.anchor == "rollout"
        assert POLICY_LOSSES[name].__doc__ and "w_t" in POLICY_LOSSES[name].__doc__
    assert make_loss_config("drpo", None).delta == 12.5
    assert make_loss_config("ppo_clip", {}).eps_high == 0.28
    assert make_loss_config("dppo_kl", {}).delta == 0.05


def test_config_errors_name_field_value_and_fix():
    with pytest.raises(ValueError, match=r"'dpro'.*did you mean 'drpo'.*Fix"):
        make_loss_config("dpro", {})
    with pytest.raises(ValueError, match=r"unknown key 'delt'.*0\.1.*did you mean 'delta'.*Fix"):
        make_loss_config("drpo", {"delt": 0.1})
    with pytest.raises(ValueError, match=r"DRPOConfig\.delta = 0.*must be > 0.*Fix"):
        make_loss_config("drpo", {"delta": 0})
    with pytest.raises(ValueError, match=r"delta = -1"):
        DRPOConfig(delta=-1)
    with pytest.raises(ValueError, match=r"eps_low = 1\.5"):
        make_loss_config("ppo_clip", {"eps_low": 1.5})
    with pytest.raises(ValueError, match=r"dual_clip_c = 0\.5.*> 1"):
        make_loss_config("ppo_clip", {"dual_clip_c": 0.5})
    with pytest.raises(ValueError, match=r"anchor = 'pi_old'.*old_policy"):
        make_loss_config("spo", {"anchor": "pi_old"})
    with pytest.raises(ValueError, match=r"mu_weighting"):
        make_loss_config("drpo", {"mu_weighting": "yes"})
    with pytest.raises(ValueError, match=r"delta = True"):
        make_loss_config("drpo", {"delta": True})
    with pytest.raises(ValueError, match=r"top_k = 2\.5.*integer"):
        make_loss_config("dppo_topk_tv", {"top_k": 2.5})
    with pytest.raises(ValueError, match=r"unknown policy loss"):
        get_policy_loss("grpo")
    with pytest.raises(TypeError, match="DRPOConfig"):
        POLICY_LOSSES["drpo"](torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2),
                              make_loss_config("spo", {}))


def test_yaml_style_values_are_coerced():
    cfg = make_loss_config("gspo", {"eps_low": 3e-4, "eps_high": 4})
    assert cfg.eps_low == 3e-4 and cfg.eps_high == 4.0 and isinstance(cfg.eps_high, float)
    with pytest.raises(ValueError, match=r"eps_low = '3e-4' is invalid: must be a number, not a string"):
        make_loss_config("gspo", {"eps_low": "3e-4"})
    # a plain mapping is accepted as cfg by the loss functions
    loss, _ = POLICY_LOSSES["drpo"](torch.tensor([-1.0]), torch.tensor([-1.2]),
                                    torch.tensor([1.0]), torch.tensor([True]), {"delta": 0.5})
    assert torch.isfinite(loss).all()


def test_anchor_is_explicit():
    rollout, old = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert select_anchor_logp(make_loss_config("drpo", {}), rollout, old) is not old
    assert float(select_anchor_logp(make_loss_config("drpo", {}), rollout, old)) == -1.0
    cfg = make_loss_config("drpo", {"anchor": "old_policy"})
    assert float(select_anchor_logp(cfg, rollout, old)) == -2.0
    with pytest.raises(ValueError, match="old_policy"):
        select_anchor_logp(cfg, rollout, None)
    # the anchor field never changes which loss runs: same inputs, same loss
    a = POLICY_LOSSES["drpo"](rollout, old, torch.ones(1), torch.ones(1), cfg)[0]
    b = POLICY_LOSSES["drpo"](rollout, old, torch.ones(1), torch.ones(1),
                              make_loss_config("drpo", {}))[0]
    assert torch.equal(a, b)


def test_missing_extras_raise_clear_errors():
    x = torch.zeros(3)
    m = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="seq_ids"):
        POLICY_LOSSES["gspo"](x, x, x, m)
    for name in ("dppo_topk_tv", "dppo_topk_kl"):
        with pytest.raises(ValueError, match="topk_logp.*topk_logp_policy.*sampled_in_topk"):
            POLICY_LOSSES[name](x, x, x, m)
        with pytest.raises(ValueError, match="sampled_in_topk"):
            POLICY_LOSSES[name](x, x, x, m, topk_logp=torch.zeros(3, 2),
                                topk_logp_policy=torch.zeros(3, 2))
    # unrelated extras are ignored so a trainer can pass the same extras to every loss
    POLICY_LOSSES["drpo"](x, x, x, m, seq_ids=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_nonfinite_rollout_logprobs_are_dropped_and_counted(name):
    n = 8
    logp = torch.log(torch.linspace(0.1, 0.9, n)).requires_grad_(True)
    mu_logp = torch.log(torch.linspace(0.2, 0.8, n))
    mu_logp[1], mu_logp[3], mu_logp[5] = float("nan"), float("inf"), float("-inf")
    adv = torch.linspace(-1, 1, n)
    adv[6] = float("nan")
    mask = torch.ones(n, dtype=torch.bool)
    mask[7] = False
    extra = {"seq_ids": torch.arange(n) // 2}
    if "topk" in name:
        extra.update(topk_logp=mu_logp.unsqueeze(-1), topk_logp_policy=logp.detach().unsqueeze(-1),
                     sampled_in_topk=torch.ones(n, dtype=torch.bool))
    loss, m = POLICY_LOSSES[name](logp, mu_logp, adv, mask, None, **extra)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    for i in (1, 3, 5, 6, 7):
        assert loss[i] == 0 and g[i] == 0
    assert float(m["loss/dropped_nonfinite"]) == 4  # masked token 7 is not "dropped"
    assert float(m["loss/num_tokens"]) == 3
    assert all(math.isfinite(float(v)) for v in m.values())


def test_advantage_properties():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (48,), generator=g).float()
    for est in ("grpo", "dr_grpo", "rloo"):
        a = compute_advantages(rewards, 8, est).view(6, 8)
        assert torch.allclose(a.sum(1), torch.zeros(6), atol=1e-5)  # zero-mean per group
    # rloo = reward minus the mean of the *other* samples, checked by brute force
    a = compute_advantages(rewards, 8, "rloo").view(6, 8)
    r = rewards.view(6, 8)
    for i in range(8):
        others = torch.cat([r[:, :i], r[:, i + 1:]], 1).mean(1)
        assert torch.allclose(a[:, i], r[:, i] - others, atol=1e-6)
    with pytest.raises(ValueError, match="groups of 5"):
        compute_advantages(rewards, 5)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(rewards, 1, "grpo")
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(rewards, 8, "ppo")


def test_kl_estimators_unbiasedness_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits_pi, logits_ref = torch.randn(6, generator=g), torch.randn(6, generator=g)
    pi, ref = torch.softmax(logits_pi, 0), torch.softmax(logits_ref, 0)
    true_kl = float((pi * (pi.log() - ref.log())).sum())
    # exact expectation under pi of k1 and k3 equals KL(pi || ref)
    for kind in ("k1", "k3"):
        est = kl_estimate(pi.log(), ref.log(), kind)
        assert float((pi * est).sum()) == pytest.approx(true_kl, rel=1e-5)
    assert (kl_estimate(pi.log(), ref.log(), "k3") >= 0).all()
    lp = pi.log().clone().requires_grad_(True)
    (gk2,) = torch.autograd.grad(kl_estimate(lp, ref.log(), "k2").sum(), lp)
    torch.testing.assert_close(gk2, pi.log() - ref.log())  # score-function gradient of KL
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(lp, ref.log(), "k4")


def test_library_imports_only_torch_and_the_standard_library():
    """Static check of every import in drpo_megatron/algorithms (fast, and independent of what
    other tests of the session have imported): pure torch (+ pydantic for the typed configs),
    never megatron or sglang."""
    pkg = Path(drpo_megatron.algorithms.__file__).parent
    files = sorted(pkg.glob("*.py"))
    assert len(files) >= 7
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import inside the package
                    continue
                if node.module == "drpo_megatron.schema":  # the config base (pydantic only)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in ("torch", "pydantic") or root in sys.stdlib_module_names, \
                    (f.name, root)
