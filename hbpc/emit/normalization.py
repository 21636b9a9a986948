"""Code for a normalization node: the forward pass with its statistics, the derived products and HBP.

Inside the node's methods a per-sample tensor is seen as ``(G, D)``: ``D = numel(normalized_shape)``
normalized entries on the last axis (where the derived ``Mean`` reduces), ``G`` groups before them.
The Jacobian and the residual ``R_n = Σ_i g_{n,i} ∂²y_{n,i}/∂x_n²`` are full ``D × D`` matrices per
sample and group: products use the derived expressions, HBP and the ``pch-*`` modes form the
matrices by applying those products to the identity.
"""
from math import prod

from .code import NodeCode, dims, fill_template, method_lines, single_input


def _statistics_method(name, derived, groups, entries) -> list:
    """``_<node>_statistics(x, y)``: the cached tensors the products read, statistics as the rule defines them."""
    names = [s for s, _, _ in derived.statistics]
    needed = max((names.index(r) + 1 for r in derived.reads if r in names), default=0)
    lines = [f"{s} = {code}" for s, code, _ in derived.statistics[:needed]]
    definitions = ", ".join(f"{s} = {definition}" for s, _, definition in derived.statistics)
    return method_lines(f"_{name}_statistics(self, x, y)",
                   f"{', '.join(derived.reads)} over each group of {entries} normalized entries, with {definitions}",
                   [f"x, y = x.reshape(-1, {groups}, {entries}), y.reshape(-1, {groups}, {entries})", *lines,
                    f"return {', '.join(derived.reads)}{',' * (len(derived.reads) == 1)}"])


def _product_method(name, node, which, argument, doc, groups, entries) -> list:
    """A method applying one derived product to ``argument`` (*lead, *x) per group of entries; ``doc`` names it."""
    product = node.derived.products[which]
    cached = product.cached
    return method_lines(
        f"_{name}_{which}(self, {argument})", doc.format(expr=product.formula),
        [*([f"{', '.join(cached)} = {', '.join(f'self.{name}_{c}' for c in cached)}"] if cached else []),
         f"lead = lead_shape({argument}, {len(node.x_shape)})",
         f"{argument} = {argument}.reshape(*lead, {groups}, {entries})", *product.lines,
         f"return ({product.code}).reshape(*lead, {dims(node.y_shape)})"])


def normalization_code(name, node, input_vars, upstream) -> NodeCode:
    """The node's code; without a parameter ``upstream`` of it nothing needs its derivatives: only the forward."""
    rule, derived = node.rule, node.derived
    x_shape = node.x_shape
    entries = prod(node.hyper["normalized_shape"])
    groups = prod(x_shape) // entries
    reads = [f"self.{name}_{s}" for s in derived.reads]
    like = reads[0] if reads else f"self.{name}_g"
    code = NodeCode(forward=[f"a_{name} = {fill_template(rule.forward, node, input_vars)}"])
    single_input(code, name)
    if not upstream:
        return code
    if reads:
        targets = f"{', '.join(reads)}{',' * (len(reads) == 1)}"
        code.forward.append(f"{targets} = self._{name}_statistics({input_vars[0]}, a_{name})")
    code.forward.append(f"self.{name}_modes = {{}}  # mode(R_n) per curvature, formed when a pch product needs it")
    code.backward = [f"self.{name}_g = g_{name}.reshape(-1, {groups}, {entries})"] if node.plan.keeps("g") else []
    code.residual_product = lambda t, mode: f"self._{name}_residual_product({t}, {mode})"
    code.input_curvature = [f"grouped_input_curvature(S, self._{name}_jacobians(), self._{name}_residuals, "
                            "average_input_jacobian, curvature)"]
    code.mean_vjp = lambda i, M: f"grouped_mean_transpose(self._{name}_jacobians(), {M})"
    statistics = ", ".join(f"{s} = {definition}" for s, _, definition in derived.statistics)
    args = (groups, entries)
    code.methods += [
        *(_statistics_method(name, derived, *args) if reads else []),
        *_product_method(name, node, "jvp", "v",
                         f"J v = {{expr}}, derived from y = {derived.phi} with {statistics}", *args),
        *_product_method(name, node, "vjp", "u", "Jᵀ u = {expr} (derived)", *args),
        *_product_method(name, node, "residual", "t",
                         "R t = {expr} (derived), R = Σ_i g_i ∂²y_i/∂x², g the gradient at the output", *args),
        *method_lines(f"_{name}_jacobians(self)", "J_n per sample and group, (N, G, D, D): J v on the identity",
                 [f"return grouped_matrices(self._{name}_jvp, {like}, {x_shape!r}, {groups})"]),
        *method_lines(f"_{name}_residuals(self)", "R_n per sample and group, (N, G, D, D): R t on the identity",
                 [f"return grouped_matrices(self._{name}_residual, {like}, {x_shape!r}, {groups})"]),
        *method_lines(f"_{name}_residual_product(self, t, curvature)",
                 "mode(R) t: R t (hessian), 0 (ggn), or through each R_n's eigendecomposition (pch-abs, pch-clip)",
                 ["if curvature == 'hessian':", f"    return self._{name}_residual(t)", "if curvature == 'ggn':",
                  "    return 0", f"if curvature not in self.{name}_modes:",
                  f"    self.{name}_modes[curvature] = matrix_residual(self._{name}_residuals(), curvature)",
                  f"return grouped_product(self.{name}_modes[curvature], t, {x_shape!r})"]),
    ]
    return code
