"""FedProx's proximal term (Li et al. 2020) in a party's local training.

mu/2 ||w - w_global||^2 over the trainable LoRA weights keeps a party's local steps near the
round's global adapter when its data pulls elsewhere. Its gradient mu (w - w_global) is added to
the parameters' gradients rather than to the loss: the two are the same objective, and only the
gradient form can be added after Opacus' clipping and noise (see `dp_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def anchors(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """w_global: the trainable weights as loaded from the global adapter, before any step."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def add_proximal_gradient(
    params: Sequence[torch.nn.Parameter], anchor: Sequence[torch.Tensor], mu: float
) -> None:
    for p, a in zip(params, anchor, strict=True):
        if p.grad is None:
            p.grad = mu * (p - a)
        else:
            p.grad.add_(p - a, alpha=mu)


def dp_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    anchor: Sequence[torch.Tensor],
    mu: float,
) -> None:
    """One DP-SGD step of an Opacus `DPOptimizer`, with the proximal gradient added after it.

    Opacus' `pre_step` clips each example's gradient, sums them, adds the Gaussian noise and
    scales; the accountant's epsilon is for exactly that released gradient. mu (w - w_global)
    depends on no record (w is the output of earlier private steps, w_global is public), so
    adding it afterwards is post-processing and keeps the accounted epsilon. Added before, it
    would be overwritten by Opacus (in `p.grad`) or clipped with each example (in the loss).
    """
    if mu == 0.0:  # the step Opacus takes by itself, so mu = 0 trains exactly as before
        optimizer.step()
        return
    if optimizer.pre_step():  # type: ignore[attr-defined]
        add_proximal_gradient(params, anchor, mu)
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
