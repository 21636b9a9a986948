"""Per-node code: forward and backward lines, and the node's derivative methods.

Naming inside generated code: ``a_<node>`` activation, ``g_<node>`` gradient
∂L/∂a, ``t_<node>`` tangent (J v), ``u_<node>`` cotangent; ``self.<node>_*``
are tensors cached by ``forward_backward``; ``_<node>_jvp`` / ``_<node>_vjp``
apply the node's input Jacobian, ``_<node>_<role>_jvp`` / ``_vjp`` its parameter Jacobians.
"""
from dataclasses import dataclass, field
from math import prod

import sympy as sp

from hbpc.derive import derive
from hbpc.derive.elementwise import hyper_values
from hbpc.derive.printer import torch_code
from hbpc.rules.spec import Elementwise, Selection, Structured, x as X_SYMBOL, y as Y_SYMBOL


@dataclass
class NodeCode:
    """Everything the module assembler needs from one node."""

    forward: list = field(default_factory=list)
    input_grad: str = None        # g_<input> from g_<node>, emitted only where an earlier node has parameters
    backward: list = field(default_factory=list)
    methods: list = field(default_factory=list)
    residual: str = None          # attribute holding the residual coefficient r = g ⊙ φ″, if any
    input_curvature: str = None   # expression for S_x given S, average, curvature
    blocks: dict = field(default_factory=dict)  # role -> method name taking (S, average)
    cross_terms: list = field(default_factory=list)  # roles θ with ∂²Y/∂X∂θ ≠ 0


def param_code(name: str) -> str:
    return f"self.p[{name!r}]"


def _method(signature: str, doc: str, body: list) -> list:
    return [f"def {signature}:", f'    """{doc}"""', *("    " + line for line in body), ""]


def _fmt(template: str, node, input_var: str) -> str:
    values = {key: repr(value) for key, value in node["hyper"].items()}
    values.update({role: param_code(name) for role, name in node["params"].items()})
    values.setdefault("bias", "None")
    values.update(x=input_var, y_shape=repr(node["y_shape"]))
    return template.format(**values)


def elementwise_code(name, node, input_var) -> NodeCode:
    rule, derivation = node["rule"], derive(node["rule"])
    out = f"a_{name}"
    rename = {X_SYMBOL: sp.Symbol(input_var, real=True), Y_SYMBOL: sp.Symbol(out, real=True)}
    values = hyper_values(node["hyper"])
    d1 = torch_code(derivation.d1.subs(values).subs(rename))
    d2 = derivation.d2.subs(values).subs(rename)
    code = NodeCode()
    code.forward = [f"{out} = {_fmt(rule.forward, node, input_var)}", f"self.{name}_d1 = {d1}"]
    code.input_grad = f"g_{input_var[2:]} = g_{name} * self.{name}_d1"
    if d2 != 0:
        code.backward.append(f"self.{name}_r = g_{name} * ({torch_code(d2)})")
        code.residual = f"self.{name}_r"
    doc = f"φ = {rule.phi},  φ′ = {derivation.d1},  φ″ = {derivation.d2}"
    code.methods += _method(f"_{name}_jvp(self, v)", f"J v = φ′ ⊙ v  ({doc})", [f"return v * self.{name}_d1"])
    code.methods += _method(f"_{name}_vjp(self, u)", "Jᵀ u = φ′ ⊙ u", [f"return u * self.{name}_d1"])
    r = code.residual or "None"
    code.input_curvature = f"elementwise_input_curvature(S, self.{name}_d1, {r}, average_input_jacobian, curvature)"
    return code


_SELECTION_PRIMITIVES = {
    "take": ("take_jvp(v, self.{n}_idx)", "take_vjp(u, self.{n}_idx, {x_shape})",
             "take_input_curvature(S, self.{n}_idx, {x_shape}, average_input_jacobian)"),
    "pad": ("pad_jvp(v, {padding})", "pad_vjp(u, {padding})", None),
    "reshape": ("reshape_to(v, {x_shape}, {y_shape})", "reshape_to(u, {y_shape}, {x_shape})", None),
}


def selection_code(name, node, input_var) -> NodeCode:
    rule = node["rule"]
    jvp, vjp, curvature = _SELECTION_PRIMITIVES[rule.primitive]
    values = dict(n=name, x_shape=repr(node["x_shape"]), y_shape=repr(node["y_shape"]),
                  padding=repr(node["hyper"].get("padding")))
    code = NodeCode()
    forward = _fmt(rule.forward, node, input_var)
    if rule.primitive == "take":
        code.forward = [f"a_{name}, self.{name}_idx = {forward}"]
    else:
        code.forward = [f"a_{name} = {forward}"]
    code.input_grad = f"g_{input_var[2:]} = self._{name}_vjp(g_{name})"
    code.methods += _method(f"_{name}_jvp(self, v)", f"J v for {rule.key} (structural primitive {rule.primitive!r})",
                            [f"return {jvp.format(**values)}"])
    code.methods += _method(f"_{name}_vjp(self, u)", f"Jᵀ u for {rule.key}", [f"return {vjp.format(**values)}"])
    code.input_curvature = (curvature.format(**values) if curvature else
                            f"sandwich_independent(S, self._{name}_vjp, {values['x_shape']}, {values['y_shape']})")
    return code


def _view_shapes(node):
    rule = node["rule"]
    views = rule.views(node["hyper"], node["x_shape"], node["y_shape"])
    return views, (rule.constants(node["hyper"]) if rule.constants else {})


def _coeff(einsum, constants):
    return einsum.__class__(einsum.spec, einsum.operands, sp.nsimplify(einsum.coeff).subs(constants),
                            einsum.broadcast)


def _patch_args(node):
    h = node["hyper"]
    return f"{h['kernel_size']!r}, {h['stride']!r}, {h['padding']!r}, {h.get('dilation', (1, 1))!r}"


def _input_view(node, views, tensor) -> str:
    if node["rule"].input_view == "patches":
        return f"patches({tensor}, {_patch_args(node)}).reshape(*lead, *{views['X']!r})"
    return f"{tensor}.reshape(*lead, *{views['X']!r})"


def _input_view_adjoint(node, views, tensor) -> str:
    if node["rule"].input_view == "patches":
        c, h, w = node["x_shape"]
        k = node["hyper"]["kernel_size"]
        flat = f"{tensor}.reshape(*lead, {c * k[0] * k[1]}, {views['X'][-1]})"
        return f"patches_adjoint({flat}, {node['x_shape']!r}, {_patch_args(node)})"
    return f"{tensor}.reshape(*lead, *{node['x_shape']!r})"


def _param_view(node, views, role) -> str:
    key = {"weight": "W", "bias": "b"}[role]
    return f"{param_code(node['params'][role])}.reshape({', '.join(map(str, views[key]))})"


def _formula(derivation) -> str:
    return str(derivation.jacobian).replace("\n", " ")


def structured_code(name, node, input_var, caches_view) -> NodeCode:
    rule, derivation = node["rule"], derive(node["rule"])
    views, constants = _view_shapes(node)
    x_rank, y_rank = len(node["x_shape"]), len(node["y_shape"])
    names = {"W": "W", "b": "b", "X": "X", "v": "v", "u": "u", "S": "S"}
    expr = f"Y[{', '.join(map(str, rule.out))}] = {rule.expr}"
    code = NodeCode()
    code.forward = [f"a_{name} = {_fmt(rule.forward, node, input_var)}"]
    if caches_view:
        code.forward.append(f"self.{name}_X = self._{name}_view({input_var})")
        code.backward.append(f"self.{name}_g = g_{name}")
    code.methods += _method(f"_{name}_view(self, x)", f"The input as the rule reads it: (*lead, *x) -> (*lead, *{views['X']})",
                            [f"lead = lead_shape(x, {x_rank})", f"return {_input_view(node, views, 'x')}"])

    jx = derivation.tensors["X"]
    jvp = _coeff(jx.jvp, constants).code(names, f"(lead[-1], *{views['Y']!r})")
    vjp = _coeff(jx.vjp, constants).code(names, f"(lead[-1], *{views['X']!r})")
    weight = []
    if "weight" in node["params"]:
        shape, view = node["param_shapes"]["weight"], tuple(views["W"])
        weight = [f"W = reshape_to({param_code(node['params']['weight'])} if W is None else W, {shape!r}, {view!r})"]
    signature = ", W=None" if weight else ""
    code.methods += _method(
        f"_{name}_jvp(self, v{signature})", f"J v, derived from {expr}",
        [f"lead = lead_shape(v, {x_rank})", f"v = self._{name}_view(v)", *weight, f"Y = {jvp}",
         f"return reshape_to(Y, {tuple(views['Y'])!r}, {node['y_shape']!r})"])
    code.methods += _method(
        f"_{name}_vjp(self, u{signature})", f"Jᵀ u for {expr}" + ("; W replaces the weight if given" if weight else ""),
        [f"lead = lead_shape(u, {y_rank})", f"u = u.reshape(*lead, *{views['Y']!r})", *weight,
         f"X = {vjp}", f"lead = lead_shape(X, {len(views['X'])})", f"return {_input_view_adjoint(node, views, 'X')}"])
    code.input_grad = f"g_{input_var[2:]} = self._{name}_vjp(g_{name})"

    for role, param in node["params"].items():
        tensor = derivation.tensors[role]
        shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
        full = node["param_shapes"][role]
        p_jvp = _coeff(tensor.jvp, constants).code(names, f"(self.N, *{views['Y']!r})")
        p_vjp = _coeff(tensor.vjp, constants).code(names, repr(shape))
        code.methods += _method(
            f"_{name}_{role}_jvp(self, v, X)", f"J_θ v for θ = {param}: ∂Y/∂θ = {_formula(tensor)}",
            [f"v = reshape_to(v, {full!r}, {shape!r})", f"Y = {p_jvp}",
             f"return Y.reshape(*Y.shape[:-{len(views['Y'])}], *{node['y_shape']!r})"])
        code.methods += _method(
            f"_{name}_{role}_vjp(self, u, X)", f"J_θᵀ u for θ = {param} (sums over samples)",
            [f"u = u.reshape(*lead_shape(u, {y_rank}), *{views['Y']!r})", f"G = {p_vjp}",
             f"return reshape_to(G, {shape!r}, {full!r})"])
        code.backward.append(f"accumulate_grad({param_code(param)}, self._{name}_{role}_vjp(g_{name}, self.{name}_X))")
        code.methods += _block_method(name, node, role, param, tensor.block, views, shape, names)
        code.blocks[role] = f"_{name}_{role}_block"
        if tensor.couples_input:
            code.cross_terms.append(role)
    code.input_curvature = (f"sandwich_independent(S, self._{name}_vjp, {node['x_shape']!r}, {node['y_shape']!r})"
                            if not jx.sample_dependent else None)
    return code


def _block_method(name, node, role, param, block, views, shape, names) -> list:
    y_view = tuple(views["Y"])
    full = node["param_shapes"][role]
    size = prod(full)
    signature = f"_{name}_{role}_block(self, S, average)"
    reshape_s = f"S = S.reshape(*{y_view!r}, *{y_view!r})"
    if block.kind == "dense":
        return _method(signature, f"B = Σ_{{out,out'}} J_θᵀ S J_θ for θ = {param}; J_θ is the same for every sample",
                       [reshape_s, f"B = {block.matrix.code(names)}",
                        f"return DenseBlock(B.reshape({size}, {size}), {full!r})"])
    if block.kind == "kronecker":
        a_factor, b_factor = block.factors
        split = len(a_factor.spec.split("->")[1].replace("...", "")) // 2
        a = prod(shape[:split])
        return _method(
            signature,
            f"B = A ⊗ B for θ = {param}: A from S, B = E[X Xᵀ] (or X̄ X̄ᵀ when average); derived factorisation",
            [f"X = batch_mean(self.{name}_X, average)", reshape_s, f"A = {a_factor.code(names)}",
             f"B = {b_factor.code(names)} / X.shape[0]",
             f"return KroneckerBlock(A.reshape({a}, {a}), B.reshape({size // a}, {size // a}), {full!r})"])
    return _method(
        signature, f"B v = E[J_θᵀ S J_θ] v for θ = {param} (E[J_θ]ᵀ S E[J_θ] when average), matrix-free",
        [f"X = batch_mean(self.{name}_X, average)",
         "",
         "def product(v):",
         f"    t = apply_per_sample(S, self._{name}_{role}_jvp(v, X), {node['y_shape']!r})",
         f"    return self._{name}_{role}_vjp(t, X) / X.shape[0]",
         "",
         f"return OperatorBlock(product, {full!r}, S)"])


def node_code(name, node, input_var, node_plan) -> NodeCode:
    rule = node["rule"]
    if isinstance(rule, Elementwise):
        return elementwise_code(name, node, input_var)
    if isinstance(rule, Selection):
        return selection_code(name, node, input_var)
    if isinstance(rule, Structured):
        return structured_code(name, node, input_var, node_plan.caches_input_view)
    raise TypeError(f"no emitter for {rule!r}")
