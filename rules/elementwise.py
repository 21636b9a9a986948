"""Elementwise activations ``y = φ(x)``: one line each.

sympy derives φ′ and φ″; hbpc emits them in ``x``, in the output ``y`` or through
``σ(·)``, whichever is valid, finite for extreme inputs, and cheapest.
"""
from sympy import Abs, Max, Min, Piecewise, Rational, erf, exp, log, pi, sqrt, tanh

from .spec import Elementwise, alpha, beta, max_val, min_val, negative_slope, scale, shift, x

F = "torch.nn.functional"
SELU_ALPHA = Rational("1.6732632423543772848170429916717")
SELU_SCALE = Rational("1.0507009873554804934193349852946")

ELEMENTWISE = [
    Elementwise("scale", scale * x, "{x} * {scale}", {"scale": 1.0}),
    Elementwise("shift", x + shift, "{x} + {shift}", {"shift": 0.0}),
    Elementwise("relu", Max(0, x), "torch.relu({x})"),
    Elementwise("sigmoid", 1 / (1 + exp(-x)), "torch.sigmoid({x})"),
    Elementwise("tanh", tanh(x), "torch.tanh({x})"),
    Elementwise("elu", Piecewise((x, x > 0), (alpha * (exp(x) - 1), True)), F + ".elu({x}, {alpha})", {"alpha": 1.0}),
    Elementwise("selu", SELU_SCALE * Piecewise((x, x > 0), (SELU_ALPHA * (exp(x) - 1), True)), F + ".selu({x})"),
    Elementwise("leaky_relu", Piecewise((x, x > 0), (negative_slope * x, True)), F + ".leaky_relu({x}, {negative_slope})",
                {"negative_slope": 0.01}, aliases=("leakyrelu",)),
    Elementwise("softplus", log(1 + exp(beta * x)) / beta, F + ".softplus({x}, {beta}, {threshold})",
                {"beta": 1.0, "threshold": 20.0}),
    Elementwise("gelu", x * (1 + erf(x / sqrt(2))) / 2, F + ".gelu({x})"),
    Elementwise("gelu_tanh", x * (1 + tanh(sqrt(2 / pi) * (x + Rational("0.044715") * x**3))) / 2,
                F + ".gelu({x}, approximate='tanh')"),
    Elementwise("silu", x / (1 + exp(-x)), F + ".silu({x})"),
    Elementwise("mish", x * tanh(log(1 + exp(x))), F + ".mish({x})"),
    Elementwise("logsigmoid", -log(1 + exp(-x)), F + ".logsigmoid({x})"),
    Elementwise("softsign", x / (1 + Abs(x)), F + ".softsign({x})"),
    Elementwise("hardtanh", Max(min_val, Min(max_val, x)), F + ".hardtanh({x}, {min_val}, {max_val})",
                {"min_val": -1.0, "max_val": 1.0}),
]
