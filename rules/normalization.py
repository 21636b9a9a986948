"""Normalizations: per-entry maps of per-sample statistics, and the per-entry affine maps after them.

A ``Normalization`` states only ``y = φ(x, statistics)`` and each statistic as a ``Mean`` over the
normalized entries; sympy derives J v, Jᵀ u and the residual product R t. An op's weight and bias
become a ``Structured`` node after the normalization (``affine``), so their blocks are the usual ones.
"""
from math import prod

from sympy import exp, log, sqrt, symbols

from .spec import Mean, Normalization, Structured, W, X, b, eps, g, i, n, x

mu, var, ms = symbols("mu var ms", real=True)


def _entry_views(h, x_shape, y_shape):
    """Groups of normalized entries: ``X``, ``Y`` (G, D) with D = numel(normalized_shape); ``W``, ``b`` (D,)."""
    entries = prod(h["normalized_shape"])
    return {"X": (prod(x_shape) // entries, entries), "Y": (prod(y_shape) // entries, entries),
            "W": (entries,), "b": (entries,)}


AFFINE = [
    Structured("entry_affine", out=(n, g, i), expr=W[i] * X[n, g, i] + b[i], params={"weight": W, "bias": b},
               views=_entry_views, forward="torch.addcmul({bias}, {x}, {weight})"),
    Structured("entry_scale", out=(n, g, i), expr=W[i] * X[n, g, i], params={"weight": W},
               views=_entry_views, forward="{x} * {weight}"),
    Structured("entry_shift", out=(n, g, i), expr=X[n, g, i] + b[i], params={"bias": b},
               views=_entry_views, forward="{x} + {bias}"),
]

NORMALIZATIONS = [
    Normalization(
        "layer_norm", statistics=((mu, Mean(x)), (var, Mean((x - mu)**2))), phi=(x - mu) / sqrt(var + eps),
        forward="torch.nn.functional.layer_norm({x}, {normalized_shape}, None, None, {eps})", hyper={"eps": 1e-5},
        affine={("bias", "weight"): "entry_affine", ("weight",): "entry_scale", ("bias",): "entry_shift"},
        aliases=("layernorm",),
    ),
    Normalization(
        "rms_norm", statistics=((ms, Mean(x**2)),), phi=x / sqrt(ms + eps),
        forward="torch.nn.functional.rms_norm({x}, {normalized_shape}, None, {eps})", hyper={"eps": 1e-6},
        affine={("weight",): "entry_scale"}, aliases=("rmsnorm",),
    ),
]

# Softmax and log-softmax over the last axis (export lowers other axes with transposes): entries = D, the axis' size.
entries, s = symbols("entries", real=True), symbols("s", positive=True)
SOFTMAX = [
    Normalization("softmax", statistics=((s, Mean(exp(x))),), phi=exp(x) / (entries * s),
                  forward="torch.softmax({x}, -1)"),
    Normalization("log_softmax", statistics=((s, Mean(exp(x))),), phi=x - log(entries * s),
                  forward="torch.log_softmax({x}, -1)"),
]
