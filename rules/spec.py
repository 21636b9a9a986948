"""The vocabulary of the rule table: symbols and the six kinds of rule.

A rule states an op's mathematics and nothing else. Derivatives, linearity,
sample dependence and Kronecker structure are derived by ``hbpc.derive``.

Index conventions (used by every index-notation rule):

=====  =====================================================
``n``  sample index (the batch dimension)
``o``  output feature / channel
``i``  input feature; for normalizations, a normalized entry
``g``  convolution group; for normalizations, a group of normalized entries
``c``  input channel (within a group)
``k``  kernel offset (flattened ``kh*kw``; ``k`` or ``kd*kh*kw`` in 1D / 3D)
``l``  output location (flattened ``h'*w'``; likewise)
``j``  the contracted index of a product of two activations (``Bilinear``)
=====  =====================================================
"""
from dataclasses import dataclass, field

import sympy as sp

x, y = sp.symbols("x y", real=True)
# Hyper-parameters of elementwise rules, named like the torch arguments they come from.
alpha, negative_slope, beta, min_val, max_val, scale, shift, delta, eps = sp.symbols(
    "alpha negative_slope beta min_val max_val scale shift delta eps", real=True)
n, o, i, g, c, k, l, j = sp.symbols("n o i g c k l j", integer=True)
K = sp.Symbol("K", positive=True, integer=True)
W, b, X, P = (sp.IndexedBase(name) for name in ("W", "b", "X", "P"))
A, B = sp.IndexedBase("A"), sp.IndexedBase("B")  # the two activations a Bilinear rule multiplies
z, t = sp.IndexedBase("z", real=True), sp.IndexedBase("t", real=True)


def Σ(expr, *indices):
    """``Sum(expr, (idx, 0, ∞))`` over each index; ranges come from shapes at compile time."""
    return sp.Sum(expr, *((idx, 0, sp.oo) for idx in indices))


class Mean(sp.Function):
    """The mean over one sample's normalized entries of a per-entry expression (a per-sample statistic)."""


@dataclass(frozen=True)
class Elementwise:
    """``y = φ(x)`` applied entrywise.

    ``forward`` is torch code computing φ, with ``{x}`` and ``{name}`` for each
    hyper-parameter (``None``: print φ itself); ``hyper`` maps hyper-parameter names
    (symbols in φ, or torch-only options such as softplus' ``threshold``) to their torch defaults.
    """

    key: str
    phi: sp.Expr
    forward: str = None
    hyper: dict = field(default_factory=dict)
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name


@dataclass(frozen=True)
class Normalization:
    """``y = φ(x, s₁, …)`` per entry, with per-sample statistics ``s_k = Mean(h_k)`` of the normalized entries.

    ``x`` is one entry of a group of normalized entries (for layer norm: the trailing
    ``normalized_shape`` dimensions of a sample), ``statistics`` an ordered tuple of pairs
    ``(s_k, Mean(h_k))`` whose ``h_k`` read ``x`` and earlier statistics. ``forward`` and ``hyper``
    are as for ``Elementwise``. ``affine`` maps the parameter roles an op may carry (a sorted tuple,
    e.g. ``("bias", "weight")``) to the Structured rule applied after the normalization.
    """

    key: str
    statistics: tuple
    phi: sp.Expr
    forward: str
    hyper: dict = field(default_factory=dict)
    affine: dict = field(default_factory=dict)
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name


@dataclass(frozen=True)
class Structured:
    """A map linear in its input: ``Y[out] = expr`` in index notation.

    ``expr`` reads the input through ``X`` (the input viewed as ``input_view``),
    and parameters through the IndexedBases named in ``params``.
    ``views`` gives every tensor's per-sample index shape from the node's
    hyper-parameters ``h`` and per-sample shapes ``x_shape``, ``y_shape``.
    """

    key: str
    out: tuple
    expr: sp.Expr
    params: dict
    views: object
    forward: str
    input_view: str = "reshape"
    constants: object = None
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name


@dataclass(frozen=True)
class Bilinear:
    """A product of two activations: ``Y[out] = expr``, linear in ``A`` and in ``B`` (index notation).

    ``A`` and ``B`` are the node's two inputs, both indexed by the sample ``n`` first; ``views`` gives their and
    ``Y``'s per-sample index shapes from the node's hyper-parameters ``h``, the inputs' per-sample shapes
    ``x_shapes`` and ``y_shape``. ``forward`` reads the inputs as ``{x0}``, ``{x1}``. sympy derives both
    Jacobians and the Hessian cross term ∂²Y/∂A∂B (constant, nonzero).
    """

    key: str
    out: tuple
    expr: sp.Expr
    views: object
    forward: str
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name


@dataclass(frozen=True)
class Selection:
    """A linear map whose Jacobian is a structural primitive (an index map, a pad, a reshape).

    ``primitive`` names the pair of generated helpers ``<primitive>_jvp`` /
    ``<primitive>_vjp``; ``forward`` computes the output and what the primitive records.
    Selections with several inputs (``add``, ``cat``) read them as ``{x0}``, ``{x1}``, ... or ``{xs}``.
    """

    key: str
    primitive: str
    forward: str
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name


@dataclass(frozen=True)
class Loss:
    """A per-sample loss ``ℓ(z, t)`` of logits ``z[k]`` and target ``t[k]``.

    ``target`` is ``"class"`` (integer labels, ``t`` is their one-hot, label-smoothed
    if the loss has ``label_smoothing``) or ``"dense"`` (``t`` has the shape of ``z``).
    ``L = scale · Σ_n ℓ(z_n, t_n)`` with ``scale`` given per reduction as a function
    of ``N`` and ``C``; ``hyper`` names loss attributes (symbols in ℓ) and their defaults.
    """

    key: str
    ell: sp.Expr
    target: str
    scale: dict = field(default_factory=dict)
    hyper: dict = field(default_factory=dict)
    aliases: tuple = ()
    override: bool = False  # a user rule that replaces the built-in rule of the same name
