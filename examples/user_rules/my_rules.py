"""User rules for `hbpc compile --rules`: one line per activation or loss."""
from sympy import cosh, exp, log

from hbpc.rules.spec import Elementwise, Loss, k, t, x, z, Σ

RULES = [
    Elementwise("swish2", x / (1 + exp(-2 * x))),
    Loss("logcoshloss", Σ(log(cosh(z[k] - t[k])), k), target="dense",
         scale={"mean": lambda N, C: 1 / (N * C), "sum": lambda N, C: 1}),
]
