"""Random user rules, each as a sympy rule and the same function in torch (the reference).

``random_activation`` composes smooth, finite maps (tanh, sin, x·σ(x), log(1 + eˣ), exp(−x²), polynomials,
…); ``random_loss`` sums terms built from the loss rule language's constructs: free and fixed indices,
sums, double sums, Kronecker deltas and products of indexed terms. Seeded ``random.Random`` only.
"""
import random

import sympy as sp
import torch
from sympy import KroneckerDelta, Rational, cos, exp, log, sin, sqrt, tanh

from hbpc.rules.spec import Elementwise, Loss, k, t, x, z, Σ

m = sp.Symbol("m", integer=True)
CLASSES = 3
PER_SAMPLE = {"mean": lambda N, C: 1 / N, "sum": lambda N, C: 1}


def _constant(rng):
    return Rational(rng.choice([-3, -2, -1, 1, 2, 3]), rng.choice([1, 2, 4]))


# unary maps: (sympy of u, torch of u); each stays finite for |u| up to ~ 10
_UNARY = [
    (lambda u, c: tanh(u), lambda u, c: torch.tanh(u)),
    (lambda u, c: sin(u), lambda u, c: torch.sin(u)),
    (lambda u, c: cos(c * u), lambda u, c: torch.cos(float(c) * u)),
    (lambda u, c: u / (1 + exp(-u)), lambda u, c: u * torch.sigmoid(u)),
    (lambda u, c: log(1 + exp(u)), lambda u, c: torch.nn.functional.softplus(u)),
    (lambda u, c: exp(-u**2 / 2), lambda u, c: torch.exp(-u**2 / 2)),
    (lambda u, c: u**2 / 2 + c * u, lambda u, c: u**2 / 2 + float(c) * u),
    (lambda u, c: u**3 / 6, lambda u, c: u**3 / 6),
    (lambda u, c: 1 / (1 + u**2), lambda u, c: 1 / (1 + u**2)),
    (lambda u, c: sqrt(1 + u**2), lambda u, c: torch.sqrt(1 + u**2)),
    (lambda u, c: exp(tanh(u)), lambda u, c: torch.exp(torch.tanh(u))),
    (lambda u, c: c * u + 1, lambda u, c: float(c) * u + 1),
]


_WITH_EXP = {3, 4, 5, 10}  # maps through exp: sympy's σ rewrite factors them, so only on the variable itself
_RATIONAL = {8}  # 1/(1 + u²) of a composite expands into huge loss Hessians


def random_map(rng, variable, depth):
    """(sympy, torch) of a random smooth composition of ``depth`` unary maps, sums and products."""
    if depth == 0:
        return variable, (lambda u: u)
    choice = rng.random()
    if choice < 0.7:
        inner, inner_torch = random_map(rng, variable, depth - 1)
        allowed = range(len(_UNARY)) if depth == 1 else sorted(set(range(len(_UNARY))) - _WITH_EXP - _RATIONAL)
        sym, tor = _UNARY[rng.choice(allowed)]
        c = _constant(rng)
        return sym(inner, c), (lambda u: tor(inner_torch(u), c))
    left, left_torch = random_map(rng, variable, depth - 1)
    right, right_torch = random_map(rng, variable, rng.randrange(depth))
    if choice < 0.85:
        return left + right, (lambda u: left_torch(u) + right_torch(u))
    return tanh(left) * right, (lambda u: torch.tanh(left_torch(u)) * right_torch(u))


def random_activation(rng, key):
    """(Elementwise rule, torch function) of a random ``φ(x) = c·x + f(x)``.

    The linear term keeps φ non-constant and makes sympy skip inverting φ (which can take minutes);
    the output form ``y`` is exercised by the built-in rules.
    """
    f, f_torch = random_map(rng, x, rng.randint(1, 2))
    c = _constant(rng)
    return Elementwise(key, c * x + f), (lambda u: float(c) * u + f_torch(u))


def _sum_term(rng):
    f, f_torch = random_map(rng, x, 1)
    kind = rng.randrange(3)
    if kind == 0:  # Σ_k f(z[k] − t[k])
        return Σ(f.subs(x, z[k] - t[k]), k), lambda z, t: f_torch(z - t).sum(1)
    if kind == 1:  # Σ_k f(z[k]) t[k]
        return Σ(f.subs(x, z[k]) * t[k], k), lambda z, t: (f_torch(z) * t).sum(1)
    return Σ(f.subs(x, z[k]), k), lambda z, t: f_torch(z).sum(1)


def _fixed_term(rng):
    f, f_torch = random_map(rng, x, 1)
    a, b = rng.randrange(CLASSES), rng.randrange(CLASSES)
    if rng.random() < 0.5:  # f(z[a]) t[b]
        return f.subs(x, z[a]) * t[b], lambda z, t: f_torch(z[:, a]) * t[:, b]
    return f.subs(x, z[a]) * z[b], lambda z, t: f_torch(z[:, a]) * z[:, b]  # a product of indexed terms


def _delta_term(rng):
    f, f_torch = random_map(rng, x, 1)
    a = rng.randrange(CLASSES)
    return Σ(KroneckerDelta(k, a) * f.subs(x, z[k] + t[k]), k), lambda z, t: f_torch(z[:, a] + t[:, a])


def _product_of_sums(rng):
    f, f_torch = random_map(rng, x, 1)
    c = _constant(rng)
    return (Σ(z[k] * t[k], k) * Σ(f.subs(x, z[k]), k) * c,
            lambda z, t: (z * t).sum(1) * f_torch(z).sum(1) * float(c))


def _double_sum(rng):
    c = _constant(rng)
    if rng.random() < 0.5:
        return (Σ((z[k] - z[m]) ** 2 * c, k, m),
                lambda z, t: ((z[:, :, None] - z[:, None, :]) ** 2).sum((1, 2)) * float(c))
    return (Σ((z[k] - c * Σ(z[m] * t[m], m)) ** 2, k),
            lambda z, t: ((z - float(c) * (z * t).sum(1, keepdim=True)) ** 2).sum(1))


def _log_sum_exp(rng):
    a = rng.randrange(CLASSES)
    return log(Σ(exp(z[k]), k)) - z[a], lambda z, t: torch.logsumexp(z, 1) - z[:, a]


_TERMS = [_sum_term, _sum_term, _fixed_term, _delta_term, _product_of_sums, _double_sum, _log_sum_exp]


def random_loss(rng, key):
    """(Loss rule, torch ℓ of (N, C) tensors → (N,)) of a random sum of 1 to 3 terms that reads z."""
    while True:
        parts = [rng.choice(_TERMS)(rng) for _ in range(rng.randint(1, 3))]
        ell = sp.Add(*(p[0] for p in parts))
        if ell.has(z):
            references = [p[1] for p in parts]
            return Loss(key, ell, "dense", PER_SAMPLE), (lambda z, t: sum(r(z, t) for r in references))
