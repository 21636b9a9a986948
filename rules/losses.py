"""Losses as per-sample expressions of the logits ``z[k]`` and target ``t[k]``.

``L = scale · Σ_n ℓ(z_n, t_n)``; sympy derives ∂ℓ/∂z and ∂²ℓ/∂z².
"""
from sympy import exp, log

from .spec import Loss, k, t, z, Σ

LOSSES = [
    Loss(
        "cross_entropy", -Σ(t[k] * z[k], k) + log(Σ(exp(z[k]), k)), target="class",
        scale={"mean": lambda N, C: 1 / N, "sum": lambda N, C: 1}, aliases=("crossentropyloss",),
    ),
    Loss(
        "mse", Σ((z[k] - t[k]) ** 2, k), target="dense",
        scale={"mean": lambda N, C: 1 / (N * C), "sum": lambda N, C: 1}, aliases=("mseloss", "mse_loss"),
    ),
]
