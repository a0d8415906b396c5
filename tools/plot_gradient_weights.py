#!/usr/bin/env python
"""Plot the gradient weight w of every policy loss against pi at several mu (the DRPO paper's
Figure 1, extended to every loss in the registry).

w is read off the library itself: w_t = -(d loss_t / d logp_t) / (A_t r_t) from autograd, so the
figure shows what the code does, not a re-derivation. Solid lines: A = +1; dashed: A = -1.
GSPO is drawn for one-token sequences (s = r); the top-K DPPO losses with K = 1 and the sampled
token as the engine's top-1, where they reduce to their binary forms.

    python tools/plot_gradient_weights.py [--out docs/gradient_weights.png]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from drpo_megatron.algorithms import POLICY_LOSSES, make_loss_config  # noqa: E402

MUS = (0.01, 0.1, 0.5, 0.9)
Y_LIMITS = (-1.5, 2.5)  # SPO's weight is unbounded; clip the view, not the data

# (panel title, loss name, config params): every registered loss with its defaults, plus the
# small-delta regimes that show what the defaults hide.
PANELS = [(name, name, {}, Y_LIMITS) for name in POLICY_LOSSES] + [
    ("drpo (default delta = 12.5), zoomed", "drpo", {}, (0.9, 1.1)),
    ("drpo, delta = 0.15", "drpo", {"delta": 0.15}, Y_LIMITS),
    ("spo, eps = 0.2", "spo", {"epsilon": 0.2}, Y_LIMITS),
]


def weights(name: str, params: dict, mu: float, adv: float, pi: torch.Tensor) -> torch.Tensor:
    n = pi.numel()
    logp = torch.log(pi).requires_grad_(True)
    mu_logp = torch.full((n,), math.log(mu), dtype=pi.dtype)
    a = torch.full((n,), adv, dtype=pi.dtype)
    extra = {"seq_ids": torch.arange(n),
             "topk_logp": mu_logp.unsqueeze(-1), "topk_logp_policy": logp.detach().unsqueeze(-1),
             "sampled_in_topk": torch.ones(n, dtype=torch.bool)}
    loss, _ = POLICY_LOSSES[name](logp, mu_logp, a, torch.ones(n, dtype=torch.bool),
                                  make_loss_config(name, params), **extra)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    return -g / (a * pi / mu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--out", default=os.path.join(root, "docs", "gradient_weights.png"))
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pi = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    cols = 6
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.1 * rows), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, name, params, ylim) in zip(axes.flat, PANELS):
        for color, mu in zip(colors, MUS):
            for adv, style in ((1.0, "-"), (-1.0, "--")):
                w = weights(name, params, mu, adv, pi)
                ax.plot(pi.numpy(), w.numpy(), style, color=color, lw=1.3,
                        label=f"mu = {mu}" if adv > 0 else None)
            ax.axvline(mu, color=color, lw=0.5, alpha=0.4)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_ylim(*ylim)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.2)
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("pi (prob. of the sampled token)")
    for ax in axes[:, 0]:
        ax.set_ylabel("gradient weight w")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Gradient weight w(pi; mu) of every policy loss (defaults unless stated); "
                 "solid A > 0, dashed A < 0; ascent direction = A r w grad log pi", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
