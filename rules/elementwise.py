"""Elementwise activations ``y = φ(x)``: one line each.

sympy derives φ′ and φ″ and rewrites them in terms of ``y`` where that is cheaper.
"""
from sympy import Max, exp, tanh

from .spec import Elementwise, x

ELEMENTWISE = [
    Elementwise("relu", Max(0, x), "torch.relu"),
    Elementwise("sigmoid", 1 / (1 + exp(-x)), "torch.sigmoid"),
    Elementwise("tanh", tanh(x), "torch.tanh"),
]
