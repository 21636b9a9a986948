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
    residual: str = None          # attribute holding the residual coefficient r = g ⊙ φ″, if any
    input_curvature: list = field(default_factory=list)
    mean_vjp: object = None
    blocks: dict = field(default_factory=dict)  # role -> method name taking (S, average)
    cross_terms: list = field(default_factory=list)  # roles θ with ∂²Y/∂X∂θ ≠ 0
    cross: object = None  # multi-input nodes: (i, j) -> code for E[J_i]ᵀ S E[J_j]


def _single_input(code, name):
    code.jvp = lambda tangents: f"self._{name}_jvp({tangents[0]})"
    code.vjp = lambda u: [f"self._{name}_vjp({u})"]


def _dims(shape) -> str:
    """``(1, 8, 25)`` as ``1, 8, 25`` for reshape arguments."""
    return ", ".join(map(str, shape))


def param_code(name: str) -> str:
    return f"self.p[{name!r}]"


def doc_safe(text: str) -> str:
    """Text that cannot end a docstring or start an escape, whatever parameter names it quotes."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _method(signature: str, doc: str, body: list) -> list:
    return [f"def {signature}:", f'    """{doc_safe(doc)}"""', *("    " + line for line in body), ""]


def _fmt(template: str, node, input_vars: list) -> str:
    values = {key: repr(value) for key, value in node["hyper"].items()}
    values.update({role: param_code(name) for role, name in node["params"].items()})
    values.update({role: f"self.buffers[{name!r}]" for role, name in node.get("buffers", {}).items()})
    values.setdefault("bias", "None")
    values.update({f"x{i}": var for i, var in enumerate(input_vars)})
    values.update(x=input_vars[0], xs=", ".join(input_vars), y_shape=repr(node["y_shape"]))
    return template.format(**values)


def elementwise_code(name, node, input_vars) -> NodeCode:
    rule, derivation = node["rule"], derive(node["rule"])
    input_var = input_vars[0]
    out = f"a_{name}"
    rename = {X_SYMBOL: sp.Symbol(input_var, real=True), Y_SYMBOL: sp.Symbol(out, real=True)}
    values = hyper_values(node["hyper"])
    d1_expr = derivation.d1.subs(values).subs(rename)
    d1 = f"torch.full_like({input_var}, {torch_code(d1_expr)})" if d1_expr.is_number else torch_code(d1_expr)
    d2 = derivation.d2.subs(values).subs(rename)
    code = NodeCode()
    forward = (_fmt(rule.forward, node, input_vars) if rule.forward
               else torch_code(rule.phi.subs(values).subs(rename)))
    code.forward = [f"{out} = {forward}", f"self.{name}_d1 = {d1}"]
    _single_input(code, name)
    if d2 != 0:
        code.backward.append(f"self.{name}_r = g_{name} * ({torch_code(d2)})")
        code.residual = f"self.{name}_r"
    doc = f"φ = {rule.phi},  φ′ = {derivation.d1},  φ″ = {derivation.d2}"
    code.methods += _method(f"_{name}_jvp(self, v)", f"J v = φ′ ⊙ v  ({doc})", [f"return v * self.{name}_d1"])
    code.methods += _method(f"_{name}_vjp(self, u)", "Jᵀ u = φ′ ⊙ u", [f"return u * self.{name}_d1"])
    r = code.residual or "None"
    code.input_curvature = [f"elementwise_input_curvature(S, self.{name}_d1, {r}, average_input_jacobian, curvature)"]
    code.mean_vjp = lambda i, M: f"self.{name}_d1.flatten(1).mean(0)[:, None] * {M}"
    return code


_SELECTION_PRIMITIVES = {
    "take": ("take_jvp(v, self.{n}_idx)", "take_vjp(u, self.{n}_idx, {x_shape})"),
    "pad": ("pad_jvp(v, {padding})", "pad_vjp(u, {padding})"),
    "reshape": ("reshape_to(v, {x_shape}, {y_shape})", "reshape_to(u, {y_shape}, {x_shape})"),
    "identity": ("v", "u"),
}


def selection_code(name, node, input_vars) -> NodeCode:
    rule = node["rule"]
    if rule.primitive in ("add", "cat"):
        return _multi_input_code(name, node, input_vars)
    jvp, vjp = _SELECTION_PRIMITIVES[rule.primitive]
    x_shape, y_shape = repr(node["x_shape"]), repr(node["y_shape"])
    spatial = len(node["x_shape"]) - 1
    flat = rule.primitive == "take" and spatial != 2
    if flat:  # 1D or 3D: the selection on (C, 1, numel(spatial)), the recorded indices get a unit row axis
        x_shape = repr((node["x_shape"][0], 1, prod(node["x_shape"][1:])))
        view = "{t}" if spatial == 1 else f"{{t}}.flatten(-{spatial})"
        as_2d = view + ".unsqueeze(-2)"
        jvp = ("take_jvp(" + as_2d.format(t="v") + ", self.{n}_idx)"
               + f".reshape(*v.shape[:-{spatial + 1}], *{node['y_shape']!r})")
        vjp = ("take_vjp(" + as_2d.format(t="u") + ", self.{n}_idx, {x_shape})"
               + f".reshape(*u.shape[:-{spatial + 1}], *{node['x_shape']!r})")
    values = dict(n=name, x_shape=x_shape, y_shape=y_shape, padding=repr(node["hyper"].get("padding")))
    code = NodeCode()
    forward = _fmt(rule.forward, node, input_vars)
    if rule.primitive == "take":
        code.forward = [f"a_{name}, self.{name}_idx = {forward}"]
        if flat:
            index = f"self.{name}_idx" if spatial == 1 else f"self.{name}_idx.flatten(-{spatial})"
            code.forward.append(f"self.{name}_idx = {index}.unsqueeze(-2)")
        code.input_curvature = [f"take_input_curvature(S, self.{name}_idx, {x_shape}, average_input_jacobian)"]
        code.mean_vjp = lambda i, M: f"take_mean_transpose({M}, self.{name}_idx, {x_shape})"
    else:
        code.forward = [f"a_{name} = {forward}"]
        code.input_curvature = [f"sandwich_independent(S, self._{name}_vjp, {x_shape}, {y_shape})"]
        code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp, {y_shape})"
    _single_input(code, name)
    code.methods += _method(f"_{name}_jvp(self, v)", f"J v for {rule.key} (structural primitive {rule.primitive!r})",
                            [f"return {jvp.format(**values)}"])
    code.methods += _method(f"_{name}_vjp(self, u)", f"Jᵀ u for {rule.key}", [f"return {vjp.format(**values)}"])
    return code


def _multi_input_code(name, node, input_vars) -> NodeCode:
    """``add`` (Jᵢ = I) and ``cat`` (Jᵢ selects input i's slice): linear and sample-independent."""
    rule, y_shape, x_shapes = node["rule"], node["y_shape"], node["x_shapes"]
    code = NodeCode()
    code.forward = [f"a_{name} = {_fmt(rule.forward, node, input_vars)}"]
    if rule.primitive == "add":
        code.jvp = lambda tangents: " + ".join(t for t in tangents if t)
        code.vjp = lambda u: [u] * len(input_vars)
        code.input_curvature = ["S"] * len(input_vars)
        code.mean_vjp = lambda i, M: M
        code.cross = lambda i, j: "S"
        return code
    axis = node["hyper"]["dim"] - 1 - len(y_shape)  # counted from the end, so leading (V, N) dims don't matter
    offsets = [sum(shape[axis] for shape in x_shapes[:i]) for i in range(len(x_shapes))]
    for i, (offset, shape) in enumerate(zip(offsets, x_shapes)):
        code.methods += _method(f"_{name}_vjp{i}(self, u)", f"Jᵀ u for input {i} of cat: its slice",
                                [f"return u.narrow({axis}, {offset}, {shape[axis]})"])
    code.jvp = lambda tangents: f"cat_tangents([{', '.join(t or 'None' for t in tangents)}], {x_shapes!r}, {axis})"
    code.vjp = lambda u: [f"self._{name}_vjp{i}({u})" for i in range(len(x_shapes))]
    code.input_curvature = [f"sandwich_independent(S, self._{name}_vjp{i}, {shape!r}, {y_shape!r})"
                            for i, shape in enumerate(x_shapes)]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp{i}, {y_shape!r})"
    code.cross = lambda i, j: (f"cross_independent(S, self._{name}_vjp{i}, self._{name}_vjp{j}, "
                               f"{x_shapes[i]!r}, {x_shapes[j]!r}, {y_shape!r})")
    return code


def _view_shapes(node):
    rule = node["rule"]
    views = rule.views(node["hyper"], node["x_shape"], node["y_shape"])
    return views, (rule.constants(node["hyper"]) if rule.constants else {})


def _coeff(einsum, constants):
    return einsum.__class__(einsum.spec, einsum.operands, sp.nsimplify(einsum.coeff).subs(constants),
                            einsum.broadcast)


def _is_1d(node) -> bool:
    """A one-dimensional conv/pool: run as its two-dimensional form on the input viewed as (C, 1, L)."""
    return len(node["hyper"].get("kernel_size", (0, 0))) == 1


def _is_3d(node) -> bool:
    return len(node["hyper"].get("kernel_size", (0, 0))) == 3


def _nd_args(node):
    h = node["hyper"]
    return (f"{h['kernel_size']!r}, {h['stride']!r}, {h['padding']!r}, "
            f"{h.get('dilation', (1,) * len(h['kernel_size']))!r}")


def _transposed_args(node):
    """Arguments of ``transposed_patches``; a 1D transposed convolution runs as the 2D one on (C, 1, L)."""
    h = node["hyper"]
    values = [h[key] for key in ("kernel_size", "stride", "padding", "output_padding", "dilation")]
    if _is_1d(node):
        values = [(unit, *value) for unit, value in zip((1, 1, 0, 0, 1), values)]
    return ", ".join(map(repr, values))


def _as_2d(node):
    """(kernel_size, stride, padding, dilation, x_shape) of the node's two-dimensional form."""
    h = node["hyper"]
    if not _is_1d(node):
        return h["kernel_size"], h["stride"], h["padding"], h.get("dilation", (1, 1)), node["x_shape"]
    c, length = node["x_shape"]
    dilation = h.get("dilation", (1,))
    return ((1, *h["kernel_size"]), (1, *h["stride"]), (0, *h["padding"]), (1, *dilation), (c, 1, length))


def _patch_args(node):
    kernel_size, stride, padding, dilation, _ = _as_2d(node)
    return f"{kernel_size!r}, {stride!r}, {padding!r}, {dilation!r}"


def tangent_view(name, node) -> str:
    """The method mapping an input tangent to the rule's ``X`` (the view itself unless it is affine)."""
    return f"_{name}_tangent_view" if node["rule"].input_view == "standardize" else f"_{name}_view"


def _buffer(node, role) -> str:
    return f"self.buffers[{node['buffers'][role]!r}]"


def _rstd(node) -> str:
    """1/sqrt(running_var + eps) as a (C, 1) column."""
    return f"({_buffer(node, 'running_var')} + {node['hyper']['eps']!r}).rsqrt()[:, None]"


def _input_view(node, views, tensor, tangent=False) -> str:
    """The input as the rule's ``X``; for the affine ``standardize`` view a tangent drops the shift."""
    view = node["rule"].input_view
    if view == "transposed_patches":
        tensor = f"{tensor}.unsqueeze(-2)" if _is_1d(node) else tensor
        return f"transposed_patches({tensor}, {_transposed_args(node)}).reshape(*lead, {_dims(views['X'])})"
    if view == "patches" and _is_3d(node):
        return f"patches_nd({tensor}, {_nd_args(node)}).reshape(*lead, {_dims(views['X'])})"
    if view == "patches":
        tensor = f"{tensor}.unsqueeze(-2)" if _is_1d(node) else tensor
        return f"patches({tensor}, {_patch_args(node)}).reshape(*lead, {_dims(views['X'])})"
    if view == "standardize":
        flat = f"{tensor}.reshape(*lead, {_dims(views['X'])})"
        centred = flat if tangent else f"({flat} - {_buffer(node, 'running_mean')}[:, None])"
        return f"{centred} * {_rstd(node)}"
    return f"{tensor}.reshape(*lead, {_dims(views['X'])})"


def _input_view_adjoint(node, views, tensor) -> str:
    if node["rule"].input_view == "standardize":
        return f"({tensor} * {_rstd(node)}).reshape(*lead, {_dims(node['x_shape'])})"
    if node["rule"].input_view == "transposed_patches":
        flat = f"{tensor}.reshape(*lead, {node['x_shape'][0] * prod(node['hyper']['kernel_size'])}, {views['X'][-1]})"
        x_shape = _as_2d(node)[-1]
        adjoint = f"transposed_patches_adjoint({flat}, {x_shape!r}, {_transposed_args(node)})"
        return f"{adjoint}.reshape(*lead, {_dims(node['x_shape'])})" if _is_1d(node) else adjoint
    if node["rule"].input_view == "patches" and _is_3d(node):
        flat = f"{tensor}.reshape(*lead, {node['x_shape'][0] * prod(node['hyper']['kernel_size'])}, {views['X'][-1]})"
        return f"patches_nd_adjoint({flat}, {node['x_shape']!r}, {_nd_args(node)})"
    if node["rule"].input_view == "patches":
        k, _, _, _, x_shape = _as_2d(node)
        flat = f"{tensor}.reshape(*lead, {x_shape[0] * k[0] * k[1]}, {views['X'][-1]})"
        folded = f"patches_adjoint({flat}, {x_shape!r}, {_patch_args(node)})"
        return f"{folded}.reshape(*lead, {_dims(node['x_shape'])})" if _is_1d(node) else folded
    return f"{tensor}.reshape(*lead, {_dims(node['x_shape'])})"


def _param_view(node, views, role) -> str:
    key = {"weight": "W", "bias": "b"}[role]
    return f"{param_code(node['params'][role])}.reshape({', '.join(map(str, views[key]))})"


def _formula(derivation) -> str:
    return str(derivation.jacobian).replace("\n", " ")


def structured_code(name, node, input_vars, caches_view) -> NodeCode:
    rule, derivation = node["rule"], derive(node["rule"])
    input_var = input_vars[0]
    views, constants = _view_shapes(node)
    x_rank, y_rank = len(node["x_shape"]), len(node["y_shape"])
    names = {"W": "W", "b": "b", "X": "X", "v": "v", "u": "u", "S": "S"}
    expr = f"Y[{', '.join(map(str, rule.out))}] = {rule.expr}"
    code = NodeCode()
    code.forward = [f"a_{name} = {_fmt(rule.forward, node, input_vars)}"]
    if caches_view:
        code.forward.append(f"self.{name}_X = self._{name}_view({input_var})")
        code.backward.append(f"self.{name}_g = g_{name}")
    code.methods += _method(f"_{name}_view(self, x)", f"The input as the rule reads it: (*lead, *x) -> (*lead, *{views['X']})",
                            [f"lead = lead_shape(x, {x_rank})", f"return {_input_view(node, views, 'x')}"])
    if rule.input_view == "standardize":
        code.methods += _method(f"_{name}_tangent_view(self, v)", "The linear part of the view, for tangents",
                                [f"lead = lead_shape(v, {x_rank})", f"return {_input_view(node, views, 'v', True)}"])

    jx = derivation.tensors["X"]
    jvp = _coeff(jx.jvp, constants).code(names, f"(lead[-1], {_dims(views['Y'])})")
    vjp = _coeff(jx.vjp, constants).code(names, f"(lead[-1], {_dims(views['X'])})")
    weight = []
    if "weight" in node["params"]:
        shape, view = node["param_shapes"]["weight"], tuple(views["W"])
        weight = [f"W = reshape_to({param_code(node['params']['weight'])} if W is None else W, {shape!r}, {view!r})"]
    signature = ", W=None" if weight else ""
    code.methods += _method(
        f"_{name}_jvp(self, v)", f"J v, derived from {expr}",
        [f"v = self.{tangent_view(name, node)}(v)", *[w.replace(" if W is None else W", "") for w in weight],
         *([f"lead = lead_shape(v, {len(views['X'])})"] if jx.jvp.broadcast else []), f"Y = {jvp}",
         f"return reshape_to(Y, {tuple(views['Y'])!r}, {node['y_shape']!r})"])
    code.methods += _method(
        f"_{name}_vjp(self, u{signature})", f"Jᵀ u for {expr}" + ("; W replaces the weight if given" if weight else ""),
        [f"lead = lead_shape(u, {y_rank})", f"u = u.reshape(*lead, {_dims(views['Y'])})", *weight,
         f"X = {vjp}", f"lead = lead_shape(X, {len(views['X'])})", f"return {_input_view_adjoint(node, views, 'X')}"])
    _single_input(code, name)

    for role, param in node["params"].items():
        tensor = derivation.tensors[role]
        shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
        full = node["param_shapes"][role]
        p_jvp = _coeff(tensor.jvp, constants).code(names, f"(self.N, {_dims(views['Y'])})")
        p_vjp = _coeff(tensor.vjp, constants).code(names, repr(shape))
        code.methods += _method(
            f"_{name}_{role}_jvp(self, v, X)", f"J_θ v for θ = {param}: ∂Y/∂θ = {_formula(tensor)}",
            [f"v = reshape_to(v, {full!r}, {shape!r})", f"Y = {p_jvp}",
             f"return Y.reshape(*Y.shape[:-{len(views['Y'])}], {_dims(node['y_shape'])})"])
        code.methods += _method(
            f"_{name}_{role}_vjp(self, u, X)", f"J_θᵀ u for θ = {param} (sums over samples)",
            [f"u = u.reshape(*lead_shape(u, {y_rank}), {_dims(views['Y'])})", f"G = {p_vjp}",
             f"return reshape_to(G, {shape!r}, {full!r})"])
        code.backward.append(f"accumulate_grad({param_code(param)}, self._{name}_{role}_vjp(g_{name}, self.{name}_X))")
        code.methods += _block_method(name, node, role, param, tensor.block, views, shape, names)
        code.blocks[role] = f"_{name}_{role}_block"
        if tensor.couples_input:
            code.cross_terms.append(role)
    if jx.sample_dependent:
        raise NotImplementedError(f"{rule.key}: HBP for a sample-dependent linear map is not implemented")
    code.input_curvature = [f"sandwich_independent(S, self._{name}_vjp, {node['x_shape']!r}, {node['y_shape']!r})"]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp, {node['y_shape']!r})"
    return code


def _is_gram(einsum) -> bool:
    """Whether the factor is Σ_n X[n, i] X[n, j] (a Gram matrix over samples)."""
    inputs, output = einsum.spec.replace("...", "").split("->")
    first, second = inputs.split(",") if "," in inputs else ("", "")
    return (einsum.operands == ("X", "X") and len(first) == len(second) == 2 and first[0] == second[0]
            and output == first[1] + second[1])


def _gram_root(a, b, full) -> list:
    """Fewer samples than inputs (always so for x̄ x̄ᵀ): keep B's root X / sqrt(N) instead of B."""
    return [f"if X.shape[0] < {b}:  # B = R Rᵀ has rank <= N",
            f"    R = X.reshape(X.shape[0], {b}).T / X.shape[0] ** 0.5",
            f"    return KroneckerGramBlock(A.reshape({a}, {a}), R, {full!r})"]


def _block_method(name, node, role, param, block, views, shape, names) -> list:
    y_view = tuple(views["Y"])
    full = node["param_shapes"][role]
    size = prod(full)
    signature = f"_{name}_{role}_block(self, S, average)"
    reshape_s = f"S = S.reshape({_dims(y_view)}, {_dims(y_view)})"
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
             *(_gram_root(a, size // a, full) if _is_gram(b_factor) else []),
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


def node_code(name, node, input_vars, node_plan) -> NodeCode:
    rule = node["rule"]
    if isinstance(rule, Elementwise):
        return elementwise_code(name, node, input_vars)
    if isinstance(rule, Selection):
        return selection_code(name, node, input_vars)
    if isinstance(rule, Structured):
        return structured_code(name, node, input_vars, node_plan.caches_input_view)
    raise TypeError(f"no emitter for {rule!r}")
