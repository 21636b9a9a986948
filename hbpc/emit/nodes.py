"""Per-node code: forward and backward lines, and the node's derivative methods.

Naming inside generated code: ``a_<node>`` activation, ``g_<node>`` gradient
∂L/∂a, ``t_<node>`` tangent (J v), ``u_<node>`` cotangent; ``self.<node>_*``
are tensors cached by ``forward_backward``; ``_<node>_jvp`` / ``_<node>_vjp``
apply the node's input Jacobian, ``_<node>_<role>_jvp`` / ``_vjp`` its parameter Jacobians.
``<node>`` is the node's stem (``hbpc.emit.names``): no two nodes' identifiers collide.
"""
from math import prod

from hbpc.kinds import handler
from hbpc.rules.spec import Elementwise, Normalization, Selection, Structured

from .code import NodeCode, dims, fill_template, method_lines, param_code, single_input
from .normalization import normalization_code


def elementwise_code(name, node, input_vars) -> NodeCode:
    rule, derived = node.rule, node.derived
    input_var = input_vars[0]
    out = f"a_{name}"
    code = NodeCode()
    forward = fill_template(rule.forward, node, input_vars) if rule.forward else derived.phi.format(x=input_var)
    code.forward = [f"{out} = {forward}", f"self.{name}_d1 = {derived.d1.format(x=input_var, y=out)}"]
    single_input(code, name)
    if derived.residual is not None:
        reads = [s for s, var in (("x", input_var), ("y", out)) if s in derived.residual.reads]
        code.forward += [f"self.{name}_{s} = {var}" for s, var in (("x", input_var), ("y", out))
                         if s in reads and node.plan.keeps(s)]
        if node.plan.keeps("g"):
            code.backward.append(f"self.{name}_g, self.{name}_r = g_{name}, None  # r = g ⊙ φ″ is formed on first use")
        code.residual = f"self._{name}_residual"
        code.residual_product = lambda t, mode: f"residual_product(self._{name}_residual(), {t}, {mode})"
        reads = [f"{s} = self.{name}_{s}" for s in reads]
        code.methods += method_lines(f"_{name}_residual(self)", "r = g ⊙ φ″ (per sample, like the output), formed once",
                                     [f"if self.{name}_r is None:", *("    " + line for line in reads),
                                      f"    self.{name}_r = self.{name}_g * ({derived.residual.code})",
                                      f"return self.{name}_r"])
        code.methods += method_lines(f"_{name}_residual_product(self, t, curvature)", "mode(R) t, R = diag(g ⊙ φ″)",
                                     [f"return residual_product(self._{name}_residual(), t, curvature)"])
    code.methods += method_lines(f"_{name}_jvp(self, v)", f"J v = φ′ ⊙ v  ({derived.doc})", [f"return v * self.{name}_d1"])
    code.methods += method_lines(f"_{name}_vjp(self, u)", "Jᵀ u = φ′ ⊙ u", [f"return u * self.{name}_d1"])
    r = code.residual or "None"  # the residual's method: elementwise_input_curvature calls it unless the mode is ggn
    code.input_curvature = [f"elementwise_input_curvature(S, self.{name}_d1, {r}, average_input_jacobian, curvature)"]
    code.mean_vjp = lambda i, M: f"self.{name}_d1.flatten(1).mean(0)[:, None] * {M}"
    return code


_SELECTION_PRIMITIVES = {
    "take": ("take_jvp(v, self.{n}_idx)", "take_vjp(u, self.{n}_idx, {x_shape})"),
    "pad": ("pad_jvp(v, {padding})", "pad_vjp(u, {padding})"),
    "crop": ("torch.nn.functional.pad(v, {padding})", "torch.nn.functional.pad(u, tuple(-p for p in {padding}))"),
    "reshape": ("reshape_to(v, {x_shape}, {y_shape})", "reshape_to(u, {y_shape}, {x_shape})"),
    "identity": ("v", "u"),
}


def selection_code(name, node, input_vars) -> NodeCode:
    rule = node.rule
    if rule.primitive in ("add", "cat"):
        return _multi_input_code(name, node, input_vars)
    jvp, vjp = _SELECTION_PRIMITIVES[rule.primitive]
    x_shape, y_shape = repr(node.x_shape), repr(node.y_shape)
    spatial = len(node.x_shape) - 1
    flat = rule.primitive == "take" and spatial != 2
    if flat:  # 1D or 3D: the selection on (C, 1, numel(spatial)), the recorded indices get a unit row axis
        x_shape = repr((node.x_shape[0], 1, prod(node.x_shape[1:])))
        view = "{t}" if spatial == 1 else f"{{t}}.flatten(-{spatial})"
        as_2d = view + ".unsqueeze(-2)"
        jvp = ("take_jvp(" + as_2d.format(t="v") + ", self.{n}_idx)"
               + f".reshape(*v.shape[:-{spatial + 1}], *{node.y_shape!r})")
        vjp = ("take_vjp(" + as_2d.format(t="u") + ", self.{n}_idx, {x_shape})"
               + f".reshape(*u.shape[:-{spatial + 1}], *{node.x_shape!r})")
    values = dict(n=name, x_shape=x_shape, y_shape=y_shape, padding=repr(node.hyper.get("padding")))
    code = NodeCode()
    forward = fill_template(rule.forward, node, input_vars)
    if rule.primitive == "take":
        code.forward = [f"a_{name}, self.{name}_idx = {forward}"]
        if flat:
            index = f"self.{name}_idx" if spatial == 1 else f"self.{name}_idx.flatten(-{spatial})"
            code.forward.append(f"self.{name}_idx = {index}.unsqueeze(-2)")
        code.input_curvature = [f"take_input_curvature(S, self.{name}_idx, {x_shape}, average_input_jacobian)"]
        code.mean_vjp = lambda i, M: f"take_mean_transpose({M}, self.{name}_idx, {x_shape})"
    elif rule.primitive in ("reshape", "identity"):  # J = I on the flattened sample: S_x = S
        code.forward = [f"a_{name} = {forward}"]
        code.input_curvature = ["S"]
        code.mean_vjp = lambda i, M: M
    else:
        code.forward = [f"a_{name} = {forward}"]
        code.input_curvature = [f"sandwich_independent(S, self._{name}_vjp, {x_shape}, {y_shape})"]
        code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp, {y_shape})"
    single_input(code, name)
    code.methods += method_lines(f"_{name}_jvp(self, v)", f"J v for {rule.key} (structural primitive {rule.primitive!r})",
                            [f"return {jvp.format(**values)}"])
    code.methods += method_lines(f"_{name}_vjp(self, u)", f"Jᵀ u for {rule.key}", [f"return {vjp.format(**values)}"])
    return code


def _multi_input_code(name, node, input_vars) -> NodeCode:
    """``add`` (Jᵢ = I) and ``cat`` (Jᵢ selects input i's slice): linear and sample-independent."""
    rule, y_shape, x_shapes = node.rule, node.y_shape, list(node.x_shapes)
    code = NodeCode()
    code.forward = [f"a_{name} = {fill_template(rule.forward, node, input_vars)}"]
    if rule.primitive == "add":
        code.jvp = lambda tangents: " + ".join(t for t in tangents if t)
        code.vjp = lambda u: [u] * len(input_vars)
        code.methods += method_lines(f"_{name}_jvp(self, tangents)", "J v = Σ_i v_i over the inputs with a tangent",
                                ["present = [t for t in tangents if t is not None]", "total = present[0]",
                                 "for t in present[1:]:", "    total = total + t", "return total"])
        code.methods += method_lines(f"_{name}_vjp(self, u)", "Jᵢᵀ u = u for every input", [f"return [u] * {len(input_vars)}"])
        code.input_curvature = ["S"] * len(input_vars)
        code.mean_vjp = lambda i, M: M
        code.cross = lambda i, j: "S"
        return code
    axis = node.hyper["dim"] - 1 - len(y_shape)  # counted from the end, so leading (V, N) dims don't matter
    offsets = [sum(shape[axis] for shape in x_shapes[:i]) for i in range(len(x_shapes))]
    for i, (offset, shape) in enumerate(zip(offsets, x_shapes)):
        code.methods += method_lines(f"_{name}_vjp{i}(self, u)", f"Jᵀ u for input {i} of cat: its slice",
                                [f"return u.narrow({axis}, {offset}, {shape[axis]})"])
    code.jvp = lambda tangents: f"cat_tangents([{', '.join(t or 'None' for t in tangents)}], {x_shapes!r}, {axis})"
    code.methods += method_lines(f"_{name}_jvp(self, tangents)", "J v: the inputs' tangents concatenated, zeros where none",
                            [f"return cat_tangents(tangents, {x_shapes!r}, {axis})"])
    code.methods += method_lines(f"_{name}_vjp(self, u)", "Jᵢᵀ u for every input: its slice",
                            [f"return [{', '.join(f'self._{name}_vjp{i}(u)' for i in range(len(x_shapes)))}]"])
    code.vjp = lambda u: [f"self._{name}_vjp{i}({u})" for i in range(len(x_shapes))]
    code.input_curvature = [f"sandwich_independent(S, self._{name}_vjp{i}, {shape!r}, {y_shape!r})"
                            for i, shape in enumerate(x_shapes)]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp{i}, {y_shape!r})"
    code.cross = lambda i, j: (f"cross_independent(S, self._{name}_vjp{i}, self._{name}_vjp{j}, "
                               f"{x_shapes[i]!r}, {x_shapes[j]!r}, {y_shape!r})")
    return code


def _is_1d(node) -> bool:
    """A one-dimensional conv/pool: run as its two-dimensional form on the input viewed as (C, 1, L)."""
    return len(node.hyper.get("kernel_size", (0, 0))) == 1


def _is_3d(node) -> bool:
    return len(node.hyper.get("kernel_size", (0, 0))) == 3


def _nd_args(node):
    h = node.hyper
    return (f"{h['kernel_size']!r}, {h['stride']!r}, {h['padding']!r}, "
            f"{h.get('dilation', (1,) * len(h['kernel_size']))!r}")


def _transposed_args(node):
    """Arguments of ``transposed_patches``; a 1D transposed convolution runs as the 2D one on (C, 1, L)."""
    h = node.hyper
    values = [h[key] for key in ("kernel_size", "stride", "padding", "output_padding", "dilation")]
    if _is_1d(node):
        values = [(unit, *value) for unit, value in zip((1, 1, 0, 0, 1), values)]
    return ", ".join(map(repr, values))


def _as_2d(node):
    """(kernel_size, stride, padding, dilation, x_shape) of the node's two-dimensional form."""
    h = node.hyper
    if not _is_1d(node):
        return h["kernel_size"], h["stride"], h["padding"], h.get("dilation", (1, 1)), node.x_shape
    c, length = node.x_shape
    dilation = h.get("dilation", (1,))
    return ((1, *h["kernel_size"]), (1, *h["stride"]), (0, *h["padding"]), (1, *dilation), (c, 1, length))


def _patch_args(node):
    kernel_size, stride, padding, dilation, _ = _as_2d(node)
    return f"{kernel_size!r}, {stride!r}, {padding!r}, {dilation!r}"


def tangent_view_method(name, node):
    """The method viewing an input tangent as the rule's ``X`` (the view itself unless it is affine), or None where
    that is the tangent itself (a convolution lowered to torch's kernels reads the input unfolded)."""
    if convolution_lowering(node) or _view_is_input(node):
        return None
    return f"_{name}_tangent_view" if node.rule.input_view == "standardize" else f"_{name}_view"


def _view_is_input(node) -> bool:
    """Whether the rule's ``X`` is the input itself (a reshape to the same per-sample shape)."""
    return node.rule.input_view == "reshape" and tuple(node.derived.views["X"]) == tuple(node.x_shape)


def cached_input_view(name, node) -> str:
    """Code for the cached input as the rule's ``X`` (a lowered convolution caches the input itself)."""
    return f"self._{name}_view(self.{name}_X)" if convolution_lowering(node) else f"self.{name}_X"


def convolution_lowering(node):
    """``conv_options(...)`` code when the plan lowers the node's derived maps to torch's convolution kernels, else None."""
    if not node.plan.lowering:
        return None
    transposed = node.rule.input_view == "transposed_patches"
    h = node.hyper
    output_padding = h.get("output_padding", (0,) * len(h["kernel_size"]))
    return (f"conv_options(stride={h['stride']!r}, padding={h['padding']!r}, dilation={h['dilation']!r}, "
            f"transposed={transposed}, output_padding={output_padding!r}, groups={h['groups']!r})")


def _buffer(node, role) -> str:
    return f"self.buffers[{node.buffers[role]!r}]"


def _rstd(node) -> str:
    """1/sqrt(running_var + eps) as a (C, 1) column."""
    return f"({_buffer(node, 'running_var')} + {node.hyper['eps']!r}).rsqrt()[:, None]"


def _input_view(node, views, tensor, tangent=False) -> str:
    """The input as the rule's ``X``; for the affine ``standardize`` view a tangent drops the shift."""
    view = node.rule.input_view
    if view == "transposed_patches":
        tensor = f"{tensor}.unsqueeze(-2)" if _is_1d(node) else tensor
        return f"transposed_patches({tensor}, {_transposed_args(node)}).reshape(*lead, {dims(views['X'])})"
    if view == "patches" and _is_3d(node):
        return f"patches_nd({tensor}, {_nd_args(node)}).reshape(*lead, {dims(views['X'])})"
    if view == "patches":
        tensor = f"{tensor}.unsqueeze(-2)" if _is_1d(node) else tensor
        return f"patches({tensor}, {_patch_args(node)}).reshape(*lead, {dims(views['X'])})"
    if view == "standardize":
        flat = f"{tensor}.reshape(*lead, {dims(views['X'])})"
        centred = flat if tangent else f"({flat} - {_buffer(node, 'running_mean')}[:, None])"
        return f"{centred} * {_rstd(node)}"
    return f"{tensor}.reshape(*lead, {dims(views['X'])})"


def _input_view_adjoint(node, views, tensor) -> str:
    if node.rule.input_view == "standardize":
        return f"({tensor} * {_rstd(node)}).reshape(*lead, {dims(node.x_shape)})"
    if node.rule.input_view == "transposed_patches":
        flat = f"{tensor}.reshape(*lead, {node.x_shape[0] * prod(node.hyper['kernel_size'])}, {views['X'][-1]})"
        x_shape = _as_2d(node)[-1]
        adjoint = f"transposed_patches_adjoint({flat}, {x_shape!r}, {_transposed_args(node)})"
        return f"{adjoint}.reshape(*lead, {dims(node.x_shape)})" if _is_1d(node) else adjoint
    if node.rule.input_view == "patches" and _is_3d(node):
        flat = f"{tensor}.reshape(*lead, {node.x_shape[0] * prod(node.hyper['kernel_size'])}, {views['X'][-1]})"
        return f"patches_nd_adjoint({flat}, {node.x_shape!r}, {_nd_args(node)})"
    if node.rule.input_view == "patches":
        k, _, _, _, x_shape = _as_2d(node)
        flat = f"{tensor}.reshape(*lead, {x_shape[0] * k[0] * k[1]}, {views['X'][-1]})"
        folded = f"patches_adjoint({flat}, {x_shape!r}, {_patch_args(node)})"
        return f"{folded}.reshape(*lead, {dims(node.x_shape)})" if _is_1d(node) else folded
    return f"{tensor}.reshape(*lead, {dims(node.x_shape)})"


def _param_view(node, views, role) -> str:
    key = {"weight": "W", "bias": "b"}[role]
    return f"{param_code(node.params[role])}.reshape({', '.join(map(str, views[key]))})"


def structured_code(name, node, input_vars, caches_view) -> NodeCode:
    rule, derived = node.rule, node.derived
    input_var = input_vars[0]
    views, expr = derived.views, derived.expr
    x_rank = len(node.x_shape)
    conv = convolution_lowering(node)
    code = NodeCode()
    code.forward = [f"a_{name} = {fill_template(rule.forward, node, input_vars)}"]
    if caches_view:
        view = input_var if conv or _view_is_input(node) else f"self._{name}_view({input_var})"
        code.forward.append(f"self.{name}_X = {view}")
        if node.plan.keeps("g"):
            code.backward.append(f"self.{name}_g = g_{name}")
    if not _view_is_input(node):
        code.methods += method_lines(f"_{name}_view(self, x)", f"The input as the rule reads it: (*lead, *x) -> (*lead, *{views['X']})",
                                [f"lead = lead_shape(x, {x_rank})", f"return {_input_view(node, views, 'x')}"])
    code.tangent_view = tangent_view_method(name, node)
    if rule.input_view == "standardize":
        code.methods += method_lines(f"_{name}_tangent_view(self, v)", "The linear part of the view, for tangents",
                                [f"lead = lead_shape(v, {x_rank})", f"return {_input_view(node, views, 'v', True)}"])

    jx = derived.tensors["X"]
    weight = []
    if "weight" in node.params:
        shape, view = node.param_shapes["weight"], tuple(views["W"])
        given = f"{param_code(node.params['weight'])} if W is None else W"
        weight = [f"W = {given}" if tuple(shape) == view else f"W = reshape_to({given}, {shape!r}, {view!r})"]
    signature = ", W=None" if weight else ""
    if conv:
        code.methods += _conv_input_methods(name, node, conv, expr)
    else:
        code.methods += _einsum_input_methods(name, node, views, jx, expr, weight, signature)
    single_input(code, name)

    for role, param in node.params.items():
        tensor = derived.tensors[role]
        shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
        full = node.param_shapes[role]
        if conv and role == "weight":
            code.methods += _conv_weight_methods(name, param, conv, full, tensor)
        else:
            code.methods += _einsum_parameter_methods(name, node, role, param, tensor, views)
        code.backward.append(f"accumulate_grad({param_code(param)}, self._{name}_{role}_vjp(g_{name}, self.{name}_X))")
        code.methods += _block_method(name, node, role, param, tensor.block, views, shape)
        code.blocks[role] = f"_{name}_{role}_block"
        if tensor.couples_input:
            code.cross_terms.append(role)
    if jx.sample_dependent:
        raise NotImplementedError(f"{rule.key}: HBP for a sample-dependent linear map is not implemented")
    code.input_curvature = [_sandwich_code(name, node)]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, self._{name}_vjp, {node.y_shape!r})"
    return code


def _conv_input_methods(name, node, conv, expr) -> list:
    weight = param_code(node.params["weight"])
    lowered = "the einsum over unfolded patches, computed by torch's convolution"
    return [
        *method_lines(f"_{name}_jvp(self, v)", f"J v = conv(v, W), derived from {expr} ({lowered})",
                 [f"return conv_apply(v, {weight}, {conv})"]),
        *method_lines(f"_{name}_vjp(self, u, W=None)", f"Jᵀ u for {expr}: the input gradient of conv; W replaces the weight if given",
                 [f"return conv_input_vjp(u, {weight} if W is None else W, {node.x_shape!r}, {conv})"]),
    ]


def _conv_weight_methods(name, param, conv, full, tensor) -> list:
    return [
        *method_lines(f"_{name}_weight_jvp(self, v, X)",
                 f"J_θ v = conv(X, v) for θ = {param}: ∂Y/∂θ = {tensor.jacobian}, X the input",
                 [f"return conv_apply(X, v, {conv})"]),
        *method_lines(f"_{name}_weight_vjp(self, u, X)", f"J_θᵀ u for θ = {param}: the weight gradient of conv (sums over samples)",
                 [f"return conv_weight_vjp(u, X, {full!r}, {conv})"]),
    ]


def product_code(product, out_shape="") -> str:
    """Code for a derived product: its contraction, broadcast to ``out_shape`` (code) where it must be, times its
    constant."""
    call = product.call
    if product.broadcast_axes:
        call = f"broadcast_trailing({call}[..., {product.broadcast_axes}], {out_shape})"
    return f"{product.coeff} * {call}" if product.coeff else call


def _einsum_input_methods(name, node, views, jx, expr, weight, signature) -> list:
    y_rank = len(node.y_shape)
    jvp = product_code(jx.jvp, f"(lead[-1], {dims(views['Y'])})")
    vjp = product_code(jx.vjp, f"(lead[-1], {dims(views['X'])})")
    y_is_view = tuple(views["Y"]) == tuple(node.y_shape)
    view = tangent_view_method(name, node)
    view_tangent = [f"v = self.{view}(v)"] if view else []
    view_u = ([f"lead = lead_shape(u, {y_rank})"] if jx.vjp.broadcast_axes or not y_is_view else [])
    view_u += [] if y_is_view else [f"u = u.reshape(*lead, {dims(views['Y'])})"]
    unview_x = (["return X"] if _view_is_input(node) else
                [f"lead = lead_shape(X, {len(views['X'])})", f"return {_input_view_adjoint(node, views, 'X')}"])
    return [
        *method_lines(
            f"_{name}_jvp(self, v)", f"J v, derived from {expr}",
            [*view_tangent, *[w.replace(" if W is None else W", "") for w in weight],
             *([f"lead = lead_shape(v, {len(views['X'])})"] if jx.jvp.broadcast_axes else []), f"Y = {jvp}",
             "return Y" if y_is_view else f"return reshape_to(Y, {tuple(views['Y'])!r}, {node.y_shape!r})"]),
        *method_lines(
            f"_{name}_vjp(self, u{signature})", f"Jᵀ u for {expr}" + ("; W replaces the weight if given" if weight else ""),
            [*view_u, *weight, f"X = {vjp}", *unview_x]),
    ]


def _einsum_parameter_methods(name, node, role, param, tensor, views) -> list:
    shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
    full = node.param_shapes[role]
    p_jvp = product_code(tensor.jvp, f"(self.N, {dims(views['Y'])})")
    p_vjp = product_code(tensor.vjp, repr(shape))
    y_is_view, param_is_view = tuple(views["Y"]) == tuple(node.y_shape), shape == tuple(full)
    return [
        *method_lines(
            f"_{name}_{role}_jvp(self, v, X)", f"J_θ v for θ = {param}: ∂Y/∂θ = {tensor.jacobian}",
            [*([] if param_is_view else [f"v = reshape_to(v, {full!r}, {shape!r})"]), f"Y = {p_jvp}",
             "return Y" if y_is_view else f"return Y.reshape(*Y.shape[:-{len(views['Y'])}], {dims(node.y_shape)})"]),
        *method_lines(
            f"_{name}_{role}_vjp(self, u, X)", f"J_θᵀ u for θ = {param} (sums over samples)",
            [*([] if y_is_view else [f"u = u.reshape(*lead_shape(u, {len(node.y_shape)}), {dims(views['Y'])})"]),
             f"G = {p_vjp}", "return G" if param_is_view else f"return reshape_to(G, {shape!r}, {full!r})"]),
    ]


def _sandwich_code(name, node) -> str:
    """S_x = Jᵀ S J: two gemms with W where the Jacobian is the weight, else two passes of the vjp."""
    if node.plan.weight_sandwich:
        return f"weight_sandwich(S, {param_code(node.params['weight'])})"
    return f"sandwich_independent(S, self._{name}_vjp, {node.x_shape!r}, {node.y_shape!r})"


def _gram_root(a, b, full) -> list:
    """Fewer samples than inputs (always so for x̄ x̄ᵀ): keep B's root X / sqrt(N) instead of B."""
    return [f"if X.shape[0] < {b}:  # B = R Rᵀ has rank <= N",
            f"    R = X.reshape(X.shape[0], {b}).T / X.shape[0] ** 0.5",
            f"    return KroneckerGramBlock(A.reshape({a}, {a}), R, {full!r})"]


def _kronecker_sizes(block, shape):
    """(a, b) with θ viewed as (a, b) and B_θ = A ⊗ B, A (a, a), B (b, b)."""
    a = prod(shape[:block.split])
    return a, prod(shape) // a


def _block_method(name, node, role, param, block, views, shape) -> list:
    """The block method in the plan's representation (matrix-free where it chose that over the derived form)."""
    representation = node.plan.block(role).representation
    y_view = tuple(views["Y"])
    full = node.param_shapes[role]
    size = prod(full)
    signature = f"_{name}_{role}_block(self, S, average)"
    reshape_s = f"S = S.reshape({dims(y_view)}, {dims(y_view)})"
    if representation == "dense":
        return method_lines(signature, f"B = Σ_{{out,out'}} J_θᵀ S J_θ for θ = {param}; J_θ is the same for every sample",
                       [reshape_s, f"B = {product_code(block.matrix)}",
                        f"return DenseBlock(B.reshape({size}, {size}), {full!r})"])
    if representation == "kronecker":
        a_factor, b_factor = block.factors
        a = _kronecker_sizes(block, shape)[0]
        return method_lines(
            signature,
            f"B = A ⊗ B for θ = {param}: A from S, B = E[X Xᵀ] (or X̄ X̄ᵀ when average); derived factorisation",
            [f"X = batch_mean(self.{name}_X, average)", reshape_s, f"A = {product_code(a_factor)}",
             *(_gram_root(a, size // a, full) if block.gram else []),
             f"B = {product_code(b_factor)}", "B /= X.shape[0]",
             f"return KroneckerBlock(A.reshape({a}, {a}), B.reshape({size // a}, {size // a}), {full!r})"])
    return method_lines(
        signature, f"B v = E[J_θᵀ S J_θ] v for θ = {param} (E[J_θ]ᵀ S E[J_θ] when average), matrix-free",
        [f"X = batch_mean(self.{name}_X, average)",
         "",
         "def product(v):",
         f"    t = apply_per_sample(S, self._{name}_{role}_jvp(v, X), {node.y_shape!r})",
         f"    return self._{name}_{role}_vjp(t, X) / X.shape[0]",
         "",
         f"return OperatorBlock(product, {full!r}, S)"])


# Each rule kind's emitter, registered once: (name, node, input variables, the node's plan) -> NodeCode.
EMITTERS = {
    Elementwise: lambda name, node, input_vars, node_plan: elementwise_code(name, node, input_vars),
    Selection: lambda name, node, input_vars, node_plan: selection_code(name, node, input_vars),
    Structured: lambda name, node, input_vars, node_plan: structured_code(name, node, input_vars,
                                                                          node_plan.caches_input_view),
    Normalization: lambda name, node, input_vars, node_plan: normalization_code(name, node, input_vars,
                                                                                any(node_plan.input_needs_grad)),
}


def node_code(name, node, input_vars, node_plan) -> NodeCode:
    return handler(EMITTERS, node.rule, "emitter")(name, node, input_vars, node_plan)
