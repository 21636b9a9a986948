"""What emitting one node produces (``NodeCode``), and the small text helpers every node kind's emitter uses."""
from dataclasses import dataclass, field

from .names import safe_text


@dataclass
class NodeCode:
    """Everything the module assembler needs from one node.

    ``jvp(tangents)`` and ``vjp(u)`` return code: the output tangent from the inputs' tangents
    (``None`` where an input has none), and one input cotangent per input. ``input_curvature[i]``
    is code for ``S`` at input ``i`` given ``S`` at the output; ``mean_vjp(i, M)`` is code for
    ``E[J_i]ᵀ M`` for a ``(d_y, k)`` matrix ``M`` (the cross terms of HBP over a graph).
    """

    forward: list = field(default_factory=list)
    jvp: object = None
    vjp: object = None
    backward: list = field(default_factory=list)
    methods: list = field(default_factory=list)
    residual: str = None          # the method returning the residual coefficient r = g ⊙ φ″ (formed once), if any
    residual_product: object = None  # (t, mode) -> code for mode(R) t, if the node has a residual
    input_curvature: list = field(default_factory=list)
    mean_vjp: object = None
    blocks: dict = field(default_factory=dict)  # role -> method name taking (S, average)
    cross_terms: list = field(default_factory=list)  # roles θ with ∂²Y/∂X∂θ ≠ 0
    tangent_view: str = None  # the method viewing an input tangent as the rule's X, if it is not the tangent itself
    cross: object = None  # multi-input nodes: (i, j) -> code for E[J_i]ᵀ S E[J_j]


def single_input(code, name):
    code.jvp = lambda tangents: f"self._{name}_jvp({tangents[0]})"
    code.vjp = lambda u: [f"self._{name}_vjp({u})"]


def dims(shape) -> str:
    """``(1, 8, 25)`` as ``1, 8, 25`` for reshape arguments."""
    return ", ".join(map(str, shape))


def param_code(name: str) -> str:
    return f"self.p[{name!r}]"


def method_lines(signature: str, doc: str, body: list) -> list:
    return [f"def {signature}:", f'    """{safe_text(doc)}"""', *("    " + line for line in body), ""]


def fill_template(template: str, node, input_vars: list) -> str:
    values = {key: repr(value) for key, value in node.hyper.items()}
    values.update({role: param_code(name) for role, name in node.params.items()})
    values.update({role: f"self.buffers[{name!r}]" for role, name in node.buffers.items()})
    values.setdefault("bias", "None")
    values.update({f"x{i}": var for i, var in enumerate(input_vars)})
    values.update(x=input_vars[0], xs=", ".join(input_vars), y_shape=repr(node.y_shape))
    return template.format(**values)
