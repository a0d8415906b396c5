"""Input generators and float64 references shared by the algorithms tests (no library code)."""

import numpy as np
import torch


def regime_inputs(seed: int = 0, n_per_cell: int = 6):
    """Tokens covering mu near 0 / mid / near 1 crossed with pi near 0 / mid / near 1, r above and
    below 1, and both advantage signs. Returns float32 torch tensors (logp, mu_logp, adv)."""
    rng = np.random.default_rng(seed)
    ranges = [(1e-4, 1e-2), (0.1, 0.9), (0.99, 0.9999)]
    mus, pis = [], []
    for lo_m, hi_m in ranges:
        for lo_p, hi_p in ranges:
            mus.append(rng.uniform(lo_m, hi_m, n_per_cell))
            pis.append(rng.uniform(lo_p, hi_p, n_per_cell))
    mu = np.concatenate(mus)
    pi = np.concatenate(pis)
    n = mu.size
    adv = rng.uniform(0.2, 2.0, n) * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    logp = torch.tensor(np.log(pi), dtype=torch.float32)
    mu_logp = torch.tensor(np.log(mu), dtype=torch.float32)
    return logp, mu_logp, torch.tensor(adv, dtype=torch.float32)


def as64(*ts):
    return [t.detach().double().numpy() for t in ts]


def binary_kl(mu, pi):
    """KL(Bern(mu) || Bern(pi)) in float64."""
    return mu * np.log(mu / pi) + (1 - mu) * np.log((1 - mu) / (1 - pi))


def autograd_weight_check(fn, cfg, logp, mu_logp, adv, w_ref, ratio_ref=None, **extra):
    """Assert d loss_t / d logp_t == -A r w_ref (float64 reference)."""
    lp = logp.clone().requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, _ = fn(lp, mu_logp, adv, mask, cfg, **extra)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    lp64, mu64, a64 = as64(logp, mu_logp, adv)
    r = np.exp(lp64 - mu64) if ratio_ref is None else ratio_ref
    expected = -a64 * r * w_ref
    scale = np.abs(expected).max()
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=2e-4, atol=1e-6 * scale)
    return grad
