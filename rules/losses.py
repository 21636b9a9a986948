"""Losses as per-sample expressions of the logits ``z[k]`` and target ``t[k]``.

``L = scale · Σ_n ℓ(z_n, t_n)``; sympy derives ∂ℓ/∂z and ∂²ℓ/∂z².
"""
from sympy import Abs, Piecewise, exp, log

from .spec import Loss, beta, delta, k, t, z, Σ

PER_SAMPLE = {"mean": lambda N, C: 1 / N, "sum": lambda N, C: 1}
PER_ELEMENT = {"mean": lambda N, C: 1 / (N * C), "sum": lambda N, C: 1}
d = z[k] - t[k]

LOSSES = [
    Loss("cross_entropy", -Σ(t[k] * z[k], k) + log(Σ(exp(z[k]), k)), "class", PER_SAMPLE,
         {"label_smoothing": 0.0}, aliases=("crossentropyloss",)),
    Loss("mse", Σ(d**2, k), "dense", PER_ELEMENT, aliases=("mseloss", "mse_loss")),
    Loss("bce_with_logits", Σ(log(1 + exp(z[k])) - t[k] * z[k], k), "dense", PER_ELEMENT,
         aliases=("bcewithlogitsloss",)),
    Loss("huber", Σ(Piecewise((d**2 / 2, Abs(d) <= delta), (delta * (Abs(d) - delta / 2), True)), k), "dense",
         PER_ELEMENT, {"delta": 1.0}, aliases=("huberloss",)),
    Loss("smooth_l1", Σ(Piecewise((d**2 / (2 * beta), Abs(d) < beta), (Abs(d) - beta / 2, True)), k), "dense",
         PER_ELEMENT, {"beta": 1.0}, aliases=("smoothl1loss",)),
]
