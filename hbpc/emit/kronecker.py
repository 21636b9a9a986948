"""The KFAC family (KFAC, KFLR, KFRA) as special cases of HBP: Kronecker factors per layer.

For a layer whose weight multiplies (patches of) its input, ``y[o, l] = Σ_k W[o, k] x[k, l] + b[o]``
(Linear: one location ``l``; ConvNd with one group: ``x[·, l]`` the input patch of output location
``l``), the generated ``kronecker_factors(kind)`` approximates the weight's GGN block by ``G ⊗ A``:

* ``A = (1/N) Σ_n Σ_l x_{n,·,l} x_{n,·,l}ᵀ``, ``(d_k, d_k)``, from the cached input view;
* ``G``, ``(C_out, C_out)``, is the GGN block of the bias: ``Σ_{v,n} s s ᵀ`` with
  ``s = Σ_l u[v, n, ·, l]`` for square-root factors ``u`` (``(V, N, *y)``) backpropagated from the
  loss (KFLR: the exact root of ``∇²_{z_n} L``; KFAC: sampled gradients), or, for KFRA,
  ``Σ_{l,l'} S[(·, l), (·, l')]`` from the HBP recursion's ``S`` at the layer output
  (``ggn``, ``S_x = E[Jᵀ S J]``: Botev et al.'s recursion).

These are BackPACK's conventions (its KFAC/KFLR/KFRA), so the values can be compared.
"""
from math import prod

from .code import method_lines
from .nodes import cached_input_view

def factor_nodes(graph, order) -> dict:
    """{node: {role: parameter}} for the layers the plan made KFAC-family layers."""
    return {name: dict(graph.nodes[name]["params"]) for name in order if graph.nodes[name]["plan"].kronecker}


def shared_factor_methods(name, node) -> list:
    """The factor methods of a Linear shared over L positions, ``y[l] = W x[l] + b``, in KFAC-expand or KFAC-reduce
    form (Eschenhagen et al. 2023, curvlinops' scaling): expand treats positions as samples,
    ``A = Σ_(n,l) x xᵀ / (N L)``, ``G = Σ_(v,n,l) u uᵀ``; reduce sums before the outer products,
    ``A = Σ_n x̄ x̄ᵀ / N`` with ``x̄ = mean_l x``, ``G = Σ_(v,n) s sᵀ`` with ``s = Σ_l u``."""
    positions, d_in = node["x_shape"][:-1], node["x_shape"][-1]
    c_out, locations = node["y_shape"][-1], prod(positions)
    return [
        *method_lines(f"_{name}_input_factor(self, approx)",
                      f"A ({d_in}, {d_in}): Σ_(n,l) x xᵀ / (N L) (expand) or Σ_n x̄ x̄ᵀ / N, x̄ = mean_l x (reduce)",
                      [f"X = self.{name}_X.reshape(self.N, {locations}, {d_in})",
                       "if approx == 'reduce':",
                       "    X = X.mean(1)",
                       "    return X.T @ X / self.N",
                       f"return torch.einsum('nli,nlj->ij', X, X) / (self.N * {locations})"]),
        *method_lines(f"_{name}_root_factor(self, u, approx)",
                      f"G ({c_out}, {c_out}) from roots u (V, N, *y): Σ_(v,n,l) u uᵀ (expand) or Σ_(v,n) s sᵀ, "
                      "s = Σ_l u (reduce)",
                      [f"u = u.reshape(*u.shape[:2], {locations}, {c_out})",
                       "if approx == 'reduce':",
                       "    s = u.sum(2)",
                       "    return torch.einsum('vno,vnp->op', s, s)",
                       "return torch.einsum('vnlo,vnlp->op', u, u)"]),
        *method_lines(f"_{name}_curvature_factor(self, S, approx)",
                      f"G ({c_out}, {c_out}) from the HBP curvature S at the output: Σ_l S[(l, o), (l, p)] (expand) "
                      "or Σ_(l,l') S[(l, o), (l', p)] (reduce)",
                      [f"S = S.reshape({locations}, {c_out}, {locations}, {c_out})",
                       "if approx == 'reduce':",
                       "    return S.sum((0, 2))",
                       "return torch.diagonal(S, dim1=0, dim2=2).sum(-1)"]),
    ]


def factor_methods(name, node) -> list:
    """The node's three factor methods: input factor A, G from roots, G from the HBP curvature."""
    if node["plan"].kind == "shared matmul":
        return shared_factor_methods(name, node)
    c_out = node["y_shape"][0]
    locations = prod(node["y_shape"][1:])
    d_k = prod(node["param_shapes"]["weight"][1:])
    return [
        *method_lines(f"_{name}_input_factor(self)",
                 f"A = (1/N) Σ_n Σ_l x_l x_lᵀ over the {d_k} inputs of each output location: ({d_k}, {d_k})",
                 [f"X = {cached_input_view(name, node)}.reshape(self.N, {d_k}, -1)", "return torch.einsum('nil,njl->ij', X, X) / self.N"]),
        *method_lines(f"_{name}_root_factor(self, u)",
                 f"G = Σ_(v,n) s sᵀ with s = Σ_l u[v, n, :, l], u (V, N, *y) square-root factors: ({c_out}, {c_out})",
                 [f"s = u.reshape(*u.shape[:2], {c_out}, -1).sum(-1)", "return torch.einsum('vno,vnp->op', s, s)"]),
        *method_lines(f"_{name}_curvature_factor(self, S)",
                 f"G = Σ_(l,l') S[(o, l), (p, l')] from the HBP curvature S (d_y, d_y) at the output: ({c_out}, {c_out})",
                 [f"return S.reshape({c_out}, {locations}, {c_out}, {locations}).sum((1, 3))"]),
    ]
