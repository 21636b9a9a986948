"""Code for a ``Bilinear`` node ``y = f(a, b)``: the derived Jacobians of both operands and the cross residual.

Inside the methods an operand or output is seen as its rule view (``views``: ``A``, ``B``, ``Y``); ``self.<node>_A``,
``self.<node>_B`` cache the inputs and ``self.<node>_g`` the output gradient. Method ``i`` (0: ``A``, 1: ``B``):
``_jvp<i>`` / ``_vjp<i>`` apply ``J_i`` / ``J_iᵀ``; ``_residual<i>(t)`` is ``Σ_k g_k ∂²y_k/∂x_i∂x_j t`` for a tangent
``t`` of the other operand ``j`` (the Hessian cross term). HBP forms the per-sample Jacobians on the identity.
"""
from .code import NodeCode, dims, fill_template, method_lines

_OPERANDS = ("A", "B")


def _view(tensor, shape, view) -> str:
    """``tensor`` (*lead, *shape) as (*lead, *view)."""
    return f"{tensor}.reshape(*lead_shape({tensor}, {len(shape)}), {dims(view)})"


def _unview(tensor, view, shape) -> str:
    return f"{tensor}.reshape(*{tensor}.shape[:{tensor}.dim() - {len(view)}], {dims(shape)})"


def _operand_methods(name, node, views, i) -> list:
    """jvp, vjp and residual of operand i, from the derived einsums."""
    maps = node.derived.operands[_OPERANDS[i]]
    mine, other = _OPERANDS[i], _OPERANDS[1 - i]
    x_shapes, y_shape = node.x_shapes, node.y_shape
    cached = f"{other} = (self.{name}_{other} if {other} is None else {other}).reshape(-1, {dims(views[other])})"
    return [
        *method_lines(f"_{name}_jvp{i}(self, v, {other}=None)",
                      f"J_{mine} v: ∂Y/∂{mine} = {maps.jacobian} ({other} replaces the cached one if given)",
                      [cached, f"v = {_view('v', x_shapes[i], views[mine])}", f"Y = {maps.jvp}",
                       f"return {_unview('Y', views['Y'], y_shape)}"]),
        *method_lines(f"_{name}_vjp{i}(self, u, {other}=None)", f"J_{mine}ᵀ u (derived)",
                      [cached, f"u = {_view('u', y_shape, views['Y'])}", f"X = {maps.vjp}",
                       f"return {_unview('X', views[mine], x_shapes[i])}"]),
        *method_lines(f"_{name}_residual{i}(self, t)",
                      f"Σ_k g_k ∂²Y_k/∂{mine}∂{other} t for a tangent t of {other} (derived: the Hessian cross term)",
                      [f"g = self.{name}_g.reshape(-1, {dims(views['Y'])})",
                       f"t = {_view('t', x_shapes[1 - i], views[other])}", f"X = {maps.residual}",
                       f"return {_unview('X', views[mine], x_shapes[i])}"]),
    ]


def bilinear_code(name, node, input_vars, upstream) -> NodeCode:
    """The node's code; without a parameter upstream of either input only the forward pass."""
    rule, x_shapes, views = node.rule, node.x_shapes, node.derived.views
    code = NodeCode(forward=[f"a_{name} = {fill_template(rule.forward, node, input_vars)}"])
    code.vjp = lambda u: [f"self._{name}_vjp{i}({u})" for i in range(2)]
    if not upstream:
        return code
    same = node.inputs[0] == node.inputs[1]
    code.forward += [f"self.{name}_A, self.{name}_B = {input_vars[0]}, {input_vars[1]}",
                     f"self.{name}_J, self.{name}_modes = {{}}, {{}}  # Jacobians and residual modes, formed on use"]
    code.backward = [f"self.{name}_g = g_{name}"]
    code.residual_product = lambda t, mode: f"self._{name}_residual_products({t}, {mode})"
    expr = node.derived.expr
    pch_guard = ["if curvature not in ('hessian', 'ggn'):",
                 f"    raise NotImplementedError(f'{{curvature}}: both operands of {name} are one tensor; the mode of "
                 "its residual is not implemented (hessian and ggn are)')"] if same else []
    code.methods += [
        *_operand_methods(name, node, views, 0),
        *_operand_methods(name, node, views, 1),
        *method_lines(f"_{name}_jvp(self, tangents)", f"J v = J_A v_A + J_B v_B for {expr} (None: no tangent)",
                      ["terms = [jvp(t) for jvp, t in zip((self._{0}_jvp0, self._{0}_jvp1), tangents) "
                       "if t is not None]".format(name), "return terms[0] if len(terms) == 1 else terms[0] + terms[1]"]),
        *method_lines(f"_{name}_vjp(self, u)", "[J_Aᵀ u, J_Bᵀ u]", [f"return [self._{name}_vjp0(u), self._{name}_vjp1(u)]"]),
        *method_lines(f"_{name}_jacobians(self, i, average)",
                      "J_n of operand i per sample, (N, d_y, d_i), from J v on the identity; average: E[J] (1, d_y, d_i), "
                      "which is J at the other operand's mean (J_A is linear in B, J_B in A)",
                      ["key = (i, average)",
                       f"if key not in self.{name}_J:",
                       f"    other = (self.{name}_A, self.{name}_B)[1 - i]",
                       "    other = other.mean(0, keepdim=True) if average else other",
                       f"    jvp = (self._{name}_jvp0, self._{name}_jvp1)[i]",
                       f"    self.{name}_J[key] = per_sample_matrices(lambda v: jvp(v, other), other, {x_shapes!r}[i])",
                       f"return self.{name}_J[key]"]),
        *method_lines(f"_{name}_residual_modes(self, curvature, summed)",
                      "mode of the joint residual [[0, M], [Mᵀ, 0]] over (A, B): per sample M_n (N, d_A, d_B), or "
                      "of Σ_n M_n (summed)",
                      ["if curvature == 'ggn':", "    return None, None, None", *pch_guard,
                       "key = (curvature, summed)",
                       f"if key not in self.{name}_modes:",
                       f"    M = per_sample_matrices(self._{name}_residual0, self.{name}_B, {x_shapes[1]!r})",
                       f"    self.{name}_modes[key] = bilinear_residual_modes(M.sum(0) if summed else M, curvature)",
                       f"return self.{name}_modes[key]"]),
        *method_lines(f"_{name}_residual_products(self, tangents, curvature)",
                      "[(mode(R) t)_A, (mode(R) t)_B] for the operands' tangents (None: none or zero)",
                      ["t_a, t_b = tangents",
                       "if curvature == 'hessian':",
                       f"    return [None if t_b is None else self._{name}_residual0(t_b), "
                       f"None if t_a is None else self._{name}_residual1(t_a)]",
                       "if curvature == 'ggn':",
                       "    return [None, None]",
                       f"return bilinear_mode_product(self._{name}_residual_modes(curvature, False), tangents, "
                       f"{x_shapes!r})"]),
    ]
    residual = f"self._{name}_residual_modes(curvature, True)"
    code.input_curvature = [f"dependent_input_curvature(S, self._{name}_jacobians({i}, average_input_jacobian), "
                            f"average_input_jacobian, {residual}[{2 * i}])" for i in range(2)]
    code.cross = lambda i, j: (f"dependent_cross(S, self._{name}_jacobians({i}, True), self._{name}_jacobians({j}, True), "
                               f"{residual}[1])")
    code.mean_vjp = lambda i, M: f"dependent_mean_transpose(self._{name}_jacobians({i}, True), {M})"
    return code
