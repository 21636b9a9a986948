"""Per-node code: forward and backward lines, and the node's derivative methods.

Naming inside generated code: ``a_<node>`` activation, ``g_<node>`` gradient ∂L/∂a; ``self.<node>_*`` are
tensors cached by ``forward_backward``. A node's methods (``jvp`` / ``vjp`` apply its input Jacobian,
``<role>_jvp`` / ``<role>_vjp`` its parameter Jacobians, ``<role>_block`` build its HBP blocks) are returned as
``Method`` records for the node's ``Target``: shared by a family of nodes as ``_<family>_<suffix>(self, node, ...)``
or the node's own ``_<node>_<suffix>(self, ...)``. ``<node>`` is the node's stem (``hbpc.emit.names``): no two
nodes' or families' identifiers collide.
"""
from math import prod

from hbpc.kinds import handler
from hbpc.rules.spec import Bilinear, Elementwise, Normalization, Selection, Structured

from .bilinear import bilinear_code
from .code import Method, NodeCode, dims, fill_template, param_code, single_input_at
from .normalization import normalization_code


def elementwise_code(at, node, input_vars) -> NodeCode:
    rule, derived = node.rule, node.derived
    input_var = input_vars[0]
    out = f"a_{at.node}"
    code = NodeCode()
    forward = fill_template(rule.forward, node, input_vars) if rule.forward else derived.phi.format(x=input_var)
    code.forward = [f"{out} = {forward}", f"{at.attribute('d1')} = {derived.d1.format(x=input_var, y=out)}"]
    single_input_at(code, at)
    d1_cached = at.cached("d1")
    residual = "None"  # the residual's method: elementwise_input_curvature calls it unless the mode is ggn
    if derived.residual is not None:
        reads = [s for s in ("x", "y") if s in derived.residual.reads]
        code.forward += [f"{at.attribute(s)} = {var}" for s, var in (("x", input_var), ("y", out))
                         if s in reads and node.plan.keeps(s)]
        if node.plan.keeps("g"):
            code.backward.append(f"{at.attribute('g')}, {at.attribute('r')} = g_{at.node}, None  # r = g ⊙ φ″ is formed on first use")
        code.residual_product = lambda t, mode: f"residual_product({at.method('residual')}(), {t}, {mode})"
        residual = at.method("residual")
        code.records += [
            Method("residual", "", "r = g ⊙ φ″ (per sample, like the output), formed once",
                   (f"r = {at.cached('r')}", "if r is None:", *(f"    {s} = {at.cached(s)}" for s in reads),
                    f"    r = {at.cached('g')} * ({derived.residual.code})", f"    {at.set_cached('r', 'r')}", "return r")),
            Method("residual_product", "t, curvature", "mode(R) t, R = diag(g ⊙ φ″)",
                   (f"return residual_product({residual}(), t, curvature)",)),
        ]
    code.records += [Method("jvp", "v", f"J v = φ′ ⊙ v  ({derived.doc})", (f"return v * {d1_cached}",)),
                     Method("vjp", "u", "Jᵀ u = φ′ ⊙ u", (f"return u * {d1_cached}",))]
    code.input_curvature = [f"elementwise_input_curvature(S, {d1_cached}, {residual}, average_input_jacobian, curvature)"]
    code.mean_vjp = lambda i, M: f"{d1_cached}.flatten(1).mean(0)[:, None] * {M}"
    return code


def _take_maps(at, node):
    """J v and Jᵀ u of a recorded selection (max pooling); a 1D or 3D one runs on the sample viewed as
    (C, 1, numel(spatial)) with the recorded indices given a unit row axis (see the forward)."""
    x_shape, y_shape = node.x_shape, node.y_shape
    spatial = len(x_shape) - 1
    index = at.cached("idx")
    if spatial == 2:
        return f"take_jvp(v, {index})", f"take_vjp(u, {index}, {x_shape!r})"
    flat = (x_shape[0], 1, prod(x_shape[1:]))

    def as_2d(t):
        return f"{t if spatial == 1 else f'{t}.flatten(-{spatial})'}.unsqueeze(-2)"

    return (f"take_jvp({as_2d('v')}, {index}).reshape(*v.shape[:-{spatial + 1}], *{y_shape!r})",
            f"take_vjp({as_2d('u')}, {index}, {flat!r}).reshape(*u.shape[:-{spatial + 1}], *{x_shape!r})")


def _selection_maps(at, node):
    """(J v, Jᵀ u) code of a single-input structural primitive."""
    primitive, x_shape, y_shape = node.rule.primitive, node.x_shape, node.y_shape
    padding = node.hyper.get("padding")
    if primitive == "take":
        return _take_maps(at, node)
    if primitive == "pad":
        return f"pad_jvp(v, {padding!r})", f"pad_vjp(u, {padding!r})"
    if primitive == "crop":
        return f"torch.nn.functional.pad(v, {padding!r})", f"torch.nn.functional.pad(u, tuple(-p for p in {padding!r}))"
    if primitive == "reshape":
        return f"reshape_to(v, {x_shape!r}, {y_shape!r})", f"reshape_to(u, {y_shape!r}, {x_shape!r})"
    if primitive == "mask":
        return f"v.masked_fill({at.cached('mask')}, 0)", f"u.masked_fill({at.cached('mask')}, 0)"
    return "v", "u"  # identity


def selection_code(at, node, input_vars) -> NodeCode:
    rule = node.rule
    if rule.primitive in ("add", "cat"):
        return _multi_input_code(at, node, input_vars)
    x_shape, y_shape = node.x_shape, node.y_shape
    spatial = len(x_shape) - 1
    code = NodeCode()
    forward = fill_template(rule.forward, node, input_vars)
    if rule.primitive == "take":
        index = at.attribute("idx")
        code.forward = [f"a_{at.node}, {index} = {forward}"]
        if spatial != 2:  # see _take_maps
            flat = index if spatial == 1 else f"{index}.flatten(-{spatial})"
            code.forward.append(f"{index} = {flat}.unsqueeze(-2)")
        view = (x_shape[0], 1, prod(x_shape[1:])) if spatial != 2 else x_shape
        code.input_curvature = [f"take_input_curvature(S, {at.cached('idx')}, {view!r}, average_input_jacobian)"]
        code.mean_vjp = lambda i, M: f"take_mean_transpose({M}, {at.cached('idx')}, {view!r})"
    elif rule.primitive == "mask":  # J = diag(keep): S_x = S ⊙ keep keepᵀ
        code.forward = [f"a_{at.node} = {forward}",
                        f"{at.attribute('mask')} = fixed_mask({node.hyper['masked']!r}, {y_shape!r}, a_{at.node}.device)"]
        code.input_curvature = [f"masked_curvature(S, {at.cached('mask')})"]
        code.mean_vjp = lambda i, M: f"{M}.masked_fill({at.cached('mask')}.reshape(-1, 1), 0)"
    elif rule.primitive in ("reshape", "identity"):  # J = I on the flattened sample: S_x = S
        code.forward = [f"a_{at.node} = {forward}"]
        code.input_curvature = ["S"]
        code.mean_vjp = lambda i, M: M
    else:
        code.forward = [f"a_{at.node} = {forward}"]
        code.input_curvature = [f"sandwich_independent(S, {at.method('vjp')}, {x_shape!r}, {y_shape!r})"]
        code.mean_vjp = lambda i, M: f"transpose_matrix({M}, {at.method('vjp')}, {y_shape!r})"
    single_input_at(code, at)
    jvp, vjp = _selection_maps(at, node)
    code.records += [Method("jvp", "v", f"J v for {rule.key} (structural primitive {rule.primitive!r})", (f"return {jvp}",)),
                     Method("vjp", "u", f"Jᵀ u for {rule.key}", (f"return {vjp}",))]
    return code


def _multi_input_code(at, node, input_vars) -> NodeCode:
    """``add`` (Jᵢ = I) and ``cat`` (Jᵢ selects input i's slice): linear and sample-independent."""
    rule, y_shape, x_shapes = node.rule, node.y_shape, list(node.x_shapes)
    code = NodeCode()
    code.forward = [f"a_{at.node} = {fill_template(rule.forward, node, input_vars)}"]
    if rule.primitive == "add":
        code.vjp = lambda u: [u] * len(input_vars)
        code.records += [
            Method("jvp", "tangents", "J v = Σ_i v_i over the inputs with a tangent",
                   ("present = [t for t in tangents if t is not None]", "total = present[0]",
                    "for t in present[1:]:", "    total = total + t", "return total")),
            Method("vjp", "u", "Jᵢᵀ u = u for every input", (f"return [u] * {len(input_vars)}",))]
        code.input_curvature = ["S"] * len(input_vars)
        code.mean_vjp = lambda i, M: M
        code.cross = lambda i, j: "S"
        return code
    axis = node.hyper["dim"] - 1 - len(y_shape)  # counted from the end, so leading (V, N) dims don't matter
    offsets = [sum(shape[axis] for shape in x_shapes[:i]) for i in range(len(x_shapes))]
    code.records += [Method(f"vjp{i}", "u", f"Jᵀ u for input {i} of cat: its slice",
                            (f"return u.narrow({axis}, {offset}, {shape[axis]})",))
                     for i, (offset, shape) in enumerate(zip(offsets, x_shapes))]
    slices = ", ".join(f"{at.method(suffix)}(u)" for suffix in (f"vjp{i}" for i in range(len(x_shapes))))
    code.records += [
        Method("jvp", "tangents", "J v: the inputs' tangents concatenated, zeros where none",
               (f"return cat_tangents(tangents, {x_shapes!r}, {axis})",)),
        Method("vjp", "u", "Jᵢᵀ u for every input: its slice", (f"return [{slices}]",))]
    code.vjp = lambda u: [at.call(f"vjp{i}", u) for i in range(len(x_shapes))]
    code.input_curvature = [f"sandwich_independent(S, {at.method(f'vjp{i}')}, {shape!r}, {y_shape!r})"
                            for i, shape in enumerate(x_shapes)]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, {at.method(f'vjp{i}')}, {y_shape!r})"
    code.cross = lambda i, j: (f"cross_independent(S, {at.method(f'vjp{i}')}, {at.method(f'vjp{j}')}, "
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


def tangent_view_suffix(node):
    """The suffix of the method viewing an input tangent as the rule's ``X`` (the view itself unless it is affine),
    or None where that is the tangent itself (a convolution lowered to torch's kernels reads the input unfolded)."""
    if convolution_lowering(node) or _view_is_input(node):
        return None
    return "tangent_view" if node.rule.input_view == "standardize" else "view"


def _view_is_input(node) -> bool:
    """Whether the rule's ``X`` is the input itself (a reshape to the same per-sample shape)."""
    return node.rule.input_view == "reshape" and tuple(node.derived.views["X"]) == tuple(node.x_shape)


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
    if view == "one_hot":  # integer ids as one-hot rows in the weight's dtype
        ids = f"{tensor}.reshape(*lead, {views['X'][0]})"
        weight = param_code(node.params["weight"])
        return f"torch.nn.functional.one_hot({ids}, {views['X'][1]}).to({weight}.dtype)"
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


def structured_code(at, node, input_vars, caches_view) -> NodeCode:
    rule, derived = node.rule, node.derived
    input_var = input_vars[0]
    views, expr = derived.views, derived.expr
    x_rank = len(node.x_shape)
    conv = convolution_lowering(node)
    code = NodeCode()
    code.forward = [f"a_{at.node} = {fill_template(rule.forward, node, input_vars)}"]
    if caches_view:
        view = input_var if conv or _view_is_input(node) else at.call("view", input_var)
        code.forward.append(f"{at.attribute('X')} = {view}")
        if node.plan.keeps("g"):
            code.backward.append(f"{at.attribute('g')} = g_{at.node}")
    if not _view_is_input(node):
        code.records.append(Method("view", "x", f"The input as the rule reads it: (*lead, *x) -> (*lead, *{views['X']})",
                                   (f"lead = lead_shape(x, {x_rank})", f"return {_input_view(node, views, 'x')}")))
    code.tangent_view = tangent_view_suffix(node)
    if rule.input_view == "standardize":
        code.records.append(Method("tangent_view", "v", "The linear part of the view, for tangents",
                                   (f"lead = lead_shape(v, {x_rank})", f"return {_input_view(node, views, 'v', True)}")))

    jx = derived.tensors["X"]
    integer_input = rule.input_view == "one_hot"  # ids: no tangent, cotangent or curvature at the input
    if conv:
        code.records += _conv_input_methods(at, node, conv, expr)
    elif not integer_input:
        code.records += _einsum_input_methods(at, node, views, jx, expr)
    single_input_at(code, at)

    for role, param in node.params.items():
        tensor = derived.tensors[role]
        shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
        if conv and role == "weight":
            code.records += _conv_weight_methods(at, conv, tensor)
        else:
            code.records += _einsum_parameter_methods(at, node, role, tensor, views)
        code.backward.append(f"accumulate_grad({param_code(param)}, "
                             f"{at.call(f'{role}_vjp', f'g_{at.node}', at.attribute('X'))})")
        code.records.append(_block_method(at, node, role, tensor.block, views, shape))
        code.blocks[role] = f"{role}_block"
        if tensor.couples_input:
            code.cross_terms.append(role)
    if integer_input:
        return code
    if jx.sample_dependent:
        raise NotImplementedError(f"{rule.key}: HBP for a sample-dependent linear map is not implemented")
    code.input_curvature = [_sandwich_code(at, node)]
    code.mean_vjp = lambda i, M: f"transpose_matrix({M}, {at.method('vjp')}, {node.y_shape!r})"
    return code


def _conv_input_methods(at, node, conv, expr) -> list:
    weight = at.param("weight")
    lowered = "the einsum over unfolded patches, computed by torch's convolution"
    return [
        Method("jvp", "v", f"J v = conv(v, W), derived from {expr} ({lowered})", (f"return conv_apply(v, {weight}, {conv})",)),
        Method("vjp", "u, W=None", f"Jᵀ u for {expr}: the input gradient of conv; W replaces the weight if given",
               (f"return conv_input_vjp(u, {weight} if W is None else W, {node.x_shape!r}, {conv})",)),
    ]


def _conv_weight_methods(at, conv, tensor) -> list:
    return [
        Method("weight_jvp", "v, X", f"J_θ v = conv(X, v) for θ = {at.param_doc('weight')}: ∂Y/∂θ = {tensor.jacobian}, "
               "X the input", (f"return conv_apply(X, v, {conv})",)),
        Method("weight_vjp", "u, X", f"J_θᵀ u for θ = {at.param_doc('weight')}: the weight gradient of conv (sums over "
               "samples)", (f"return conv_weight_vjp(u, X, {at.param_shape('weight')}, {conv})",)),
    ]


def product_code(product, out_shape="") -> str:
    """Code for a derived product: its contraction, broadcast to ``out_shape`` (code) where it must be, times its
    constant."""
    call = product.call
    if product.broadcast_axes:
        call = f"broadcast_trailing({call}[..., {product.broadcast_axes}], {out_shape})"
    return f"{product.coeff} * {call}" if product.coeff else call


def _broadcast_shape(product, shape, lead=None) -> str:
    """The output shape a broadcast product expands to: ``lead`` (code for the sample axis) if given, then per axis
    its size where no operand carries it and -1 (kept as it is) where one does."""
    offset = 0 if lead is None else 1
    sizes = [str(size) if offset + axis in product.broadcast else "-1" for axis, size in enumerate(shape)]
    return f"({', '.join([*([lead] if lead else []), *sizes])}{',' if len(sizes) + offset == 1 else ''})"


def _einsum_input_methods(at, node, views, jx, expr) -> list:
    y_rank = len(node.y_shape)
    jvp = product_code(jx.jvp, _broadcast_shape(jx.jvp, views["Y"], "lead[-1]"))
    vjp = product_code(jx.vjp, _broadcast_shape(jx.vjp, views["X"], "lead[-1]"))
    y_is_view = tuple(views["Y"]) == tuple(node.y_shape)
    view = tangent_view_suffix(node)
    view_tangent = [f"v = {at.method(view)}(v)"] if view else []
    view_u = ([f"lead = lead_shape(u, {y_rank})"] if jx.vjp.broadcast_axes or not y_is_view else [])
    view_u += [] if y_is_view else [f"u = u.reshape(*lead, {dims(views['Y'])})"]
    unview_x = [f"lead = lead_shape(X, {len(views['X'])})", f"return {_input_view_adjoint(node, views, 'X')}"]
    weight, given, signature = [], [], "u"
    if "weight" in node.params:
        shape, view_shape = node.param_shapes["weight"], tuple(views["W"])
        weight = [_weight_line(at.param("weight"), shape, view_shape)]
        given = [_weight_line(f"{at.param('weight')} if W is None else W", shape, view_shape)]
        signature = "u, W=None"
    return [
        Method("jvp", "v", f"J v, derived from {expr}",
               (*view_tangent, *weight, *([f"lead = lead_shape(v, {len(views['X'])})"] if jx.jvp.broadcast_axes else []),
                *_result("Y", jvp, None if y_is_view else f"reshape_to(Y, {tuple(views['Y'])!r}, {node.y_shape!r})"))),
        Method("vjp", signature, f"Jᵀ u for {expr}" + ("; W replaces the weight if given" if weight else ""),
               (*view_u, *given, *_result("X", vjp, None if _view_is_input(node) else unview_x))),
    ]


def _result(name, code, then) -> list:
    """``return code``, or ``name = code`` followed by ``then``: a line returning it viewed, or such lines."""
    if then is None:
        return [f"return {code}"]
    return [f"{name} = {code}", *([f"return {then}"] if isinstance(then, str) else then)]


def _weight_line(weight, shape, view) -> str:
    """``W = <weight>`` as the rule's view of it."""
    return f"W = {weight}" if tuple(shape) == view else f"W = reshape_to({weight}, {tuple(shape)!r}, {view!r})"


def _einsum_parameter_methods(at, node, role, tensor, views) -> list:
    shape = tuple(views[{"weight": "W", "bias": "b"}[role]])
    full = tuple(node.param_shapes[role])
    p_jvp = product_code(tensor.jvp, _broadcast_shape(tensor.jvp, views["Y"], "self.N"))
    p_vjp = product_code(tensor.vjp, _broadcast_shape(tensor.vjp, shape))
    y_is_view, param_is_view = tuple(views["Y"]) == tuple(node.y_shape), shape == full
    return [
        Method(f"{role}_jvp", "v, X", f"J_θ v for θ = {at.param_doc(role)}: ∂Y/∂θ = {tensor.jacobian}",
               (*([] if param_is_view else [f"v = reshape_to(v, {full!r}, {shape!r})"]),
                *_result("Y", p_jvp, None if y_is_view else f"Y.reshape(*Y.shape[:-{len(views['Y'])}], {dims(node.y_shape)})"))),
        Method(f"{role}_vjp", "u, X", f"J_θᵀ u for θ = {at.param_doc(role)} (sums over samples)",
               (*([] if y_is_view else [f"u = u.reshape(*lead_shape(u, {len(node.y_shape)}), {dims(views['Y'])})"]),
                *_result("G", p_vjp, None if param_is_view else f"reshape_to(G, {shape!r}, {full!r})"))),
    ]


def _sandwich_code(at, node) -> str:
    """S_x = Jᵀ S J: two gemms with W where the plan found the Jacobian is the weight, else two passes of the vjp."""
    if node.plan.weight_sandwich:
        return f"weight_sandwich(S, {at.param('weight')})"
    return f"sandwich_independent(S, {at.method('vjp')}, {node.x_shape!r}, {node.y_shape!r})"


def _kronecker_sizes(block, shape):
    """(a, b) with θ viewed as (a, b) and B_θ = A ⊗ B, A (a, a), B (b, b)."""
    a = prod(shape[:block.split])
    return a, prod(shape) // a


def _block_method(at, node, role, block, views, shape) -> Method:
    """The block method in the plan's representation (matrix-free where it chose that over the derived form).

    θ's shape is read from the node (``at.param_shape``); the Kronecker sizes a, b from it where the rule views θ as
    it is (else from the view)."""
    representation = node.plan.block(role).representation
    y_view = tuple(views["Y"])
    full = tuple(node.param_shapes[role])
    reshape_s = [f"S = S.reshape({dims(y_view)}, {dims(y_view)})"] if len(y_view) > 1 else []
    given = at.param_shape(role)
    doc = f"θ = {at.param_doc(role)}"
    if representation == "dense":
        return Method(f"{role}_block", "S, average", f"B = Σ_{{out,out'}} J_θᵀ S J_θ for {doc}; J_θ is the same for every sample",
                      (*reshape_s, f"B = {product_code(block.matrix)}", f"shape = {given}",
                       "return DenseBlock(B.reshape(numel(shape), numel(shape)), shape)"))
    if representation == "kronecker":
        a_factor, b_factor = block.factors
        split = block.split
        if shape == full:
            sizes = f"a, b = numel(shape[:{split}]), numel(shape[{split}:])"
        else:
            sizes = "a, b = {}, {}".format(*_kronecker_sizes(block, shape))
        gram = ["if X.shape[0] < b:  # B = R Rᵀ has rank <= N", "    R = X.reshape(X.shape[0], b).T / X.shape[0] ** 0.5",
                "    return KroneckerGramBlock(A.reshape(a, a), R, shape)"] if block.gram else []
        return Method(f"{role}_block", "S, average",
                      f"B = A ⊗ B for {doc}: A from S, B = E[X Xᵀ] (or X̄ X̄ᵀ when average); derived factorisation",
                      (f"X = batch_mean({at.cached('X')}, average)", *reshape_s, f"A = {product_code(a_factor)}",
                       f"shape = {given}", sizes, *gram, f"B = {product_code(b_factor)}", "B /= X.shape[0]",
                       "return KroneckerBlock(A.reshape(a, a), B.reshape(b, b), shape)"))
    return Method(f"{role}_block", "S, average",
                  f"B v = E[J_θᵀ S J_θ] v for {doc} (E[J_θ]ᵀ S E[J_θ] when average), matrix-free",
                  (f"X = batch_mean({at.cached('X')}, average)", "", "def product(v):",
                   f"    t = apply_per_sample(S, {at.method(f'{role}_jvp')}(v, X), {node.y_shape!r})",
                   f"    return {at.method(f'{role}_vjp')}(t, X) / X.shape[0]", "",
                   f"return OperatorBlock(product, {given}, S)"))


class Shared:
    """A rule kind's emitter that takes the node's ``Target`` and returns its methods as ``Method`` records: nodes
    whose records agree share them (one family). Other emitters take the node's name and print its own methods."""

    def __init__(self, emit):
        self.emit = emit

    def __call__(self, target, node, input_vars, node_plan):
        return self.emit(target, node, input_vars, node_plan)


# Each rule kind's emitter, registered once: (Target or name, node, input variables, the node's plan) -> NodeCode.
EMITTERS = {
    Elementwise: Shared(lambda at, node, input_vars, node_plan: elementwise_code(at, node, input_vars)),
    Selection: Shared(lambda at, node, input_vars, node_plan: selection_code(at, node, input_vars)),
    Structured: Shared(lambda at, node, input_vars, node_plan: structured_code(at, node, input_vars,
                                                                               node_plan.caches_input_view)),
    Normalization: lambda name, node, input_vars, node_plan: normalization_code(name, node, input_vars,
                                                                                any(node_plan.input_needs_grad)),
    Bilinear: lambda name, node, input_vars, node_plan: bilinear_code(name, node, input_vars,
                                                                      any(node_plan.input_needs_grad)),
}


def emitter(node):
    return handler(EMITTERS, node.rule, "emitter")


def shares_methods(node) -> bool:
    """Whether the node's kind emits its methods as records a family of nodes can share."""
    return isinstance(emitter(node), Shared)


def node_code(target, node, input_vars, node_plan) -> NodeCode:
    """The node's code: ``target`` a ``Target`` for a kind that shares methods, else the node's name."""
    return emitter(node)(target, node, input_vars, node_plan)
