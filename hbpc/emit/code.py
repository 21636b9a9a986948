"""What emitting one node produces (``NodeCode``), the records its methods are printed from (``Method``), how
its code names what belongs to it (``Target``), and the small text helpers every node kind's emitter uses."""
from dataclasses import dataclass, field

from .names import safe_text


@dataclass(frozen=True)
class Target:
    """How one node's code names its methods, parameters and cached tensors.

    ``family`` None: the node's own methods ``_<node>_<suffix>(self, ...)``. Otherwise the methods are its
    family's, ``_<family>_<suffix>(self, node, ...)``, shared by every node with the same rule and the same
    derived code: their bodies read the node's parameters, shapes, cached tensors and methods through ``node``.
    Code outside the methods (forward_backward) names the node's tensors directly.
    """

    node: str
    params: dict = field(default_factory=dict)  # role -> parameter name
    param_shapes: dict = field(default_factory=dict)  # role -> shape
    family: str = None

    @property
    def shared(self) -> bool:
        return self.family is not None

    def signature(self, suffix, args="") -> str:
        owner, first = (self.family, "self, node") if self.shared else (self.node, "self")
        return f"_{owner}_{suffix}({first}{', ' + args if args else ''})"

    # inside the node's methods
    def param(self, role) -> str:
        return f"self.param(node, {role!r})" if self.shared else param_code(self.params[role])

    def param_shape(self, role) -> str:
        return f"self.param_shape(node, {role!r})" if self.shared else repr(tuple(self.param_shapes[role]))

    def param_doc(self, role) -> str:
        return f"the {role}" if self.shared else self.params[role]

    def cached(self, what) -> str:
        return f"self.cached(node, {what!r})" if self.shared else self.attribute(what)

    def set_cached(self, what, value) -> str:
        return f"self.set_cached(node, {what!r}, {value})" if self.shared else f"{self.attribute(what)} = {value}"

    def method(self, suffix) -> str:
        return f"self._method(node, {suffix!r})" if self.shared else f"self._{self.node}_{suffix}"

    # in forward_backward
    def call(self, suffix, *args) -> str:
        if self.shared:
            return f"self._{self.family}_{suffix}({', '.join([repr(self.node), *args])})"
        return f"self._{self.node}_{suffix}({', '.join(args)})"

    def attribute(self, what) -> str:
        return f"self.{self.node}_{what}"


@dataclass(frozen=True)
class Method:
    """One generated method: ``_<owner>_<suffix>(self, [node, ]args)`` with a one-line docstring and a body."""

    suffix: str
    args: str
    doc: str
    body: tuple

    def lines(self, target: Target) -> list:
        return method_lines(target.signature(self.suffix, self.args), self.doc, list(self.body))


@dataclass
class NodeCode:
    """Everything the module assembler needs from one node.

    ``vjp(u)`` returns code for one input cotangent per input (forward_backward's backward). ``input_curvature[i]``
    is code for ``S`` at input ``i`` given ``S`` at the output; ``mean_vjp(i, M)`` code for ``E[J_i]ᵀ M`` with a
    ``(d_y, k)`` matrix ``M``, ``cross(i, j)`` for ``E[J_i]ᵀ S E[J_j]`` (the cross terms of HBP over a graph): the
    assembler makes them the ``input_curvature``, ``mean_vjp`` and ``cross`` methods hbpc.runtime's sweep calls.
    """

    forward: list = field(default_factory=list)
    vjp: object = None
    backward: list = field(default_factory=list)
    methods: list = field(default_factory=list)  # lines of the node's own methods (kinds that print per node)
    records: list = field(default_factory=list)  # Method records, printed for the node's Target
    residual_product: object = None  # (t, mode) -> code for mode(R) t, if the node has a residual
    input_curvature: list = field(default_factory=list)
    mean_vjp: object = None
    blocks: dict = field(default_factory=dict)  # role -> block method ('<role>_block', or '_<node>_<role>_block')
    cross_terms: list = field(default_factory=list)  # roles θ with ∂²Y/∂X∂θ ≠ 0
    tangent_view: str = None  # the suffix of the method viewing an input tangent as the rule's X, if not the tangent
    cross: object = None  # multi-input nodes: (i, j) -> code for E[J_i]ᵀ S E[J_j]


def single_input(code, name):
    code.vjp = lambda u: [f"self._{name}_vjp({u})"]


def single_input_at(code, at: Target):
    code.vjp = lambda u: [at.call("vjp", u)]


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
