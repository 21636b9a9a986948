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

``CurvatureModule._input_factor``, ``_root_factor`` and ``_curvature_factor`` compute them from the tables.
These are BackPACK's conventions (its KFAC/KFLR/KFRA), so the values can be compared.
"""

from hbpc import ir


def factor_nodes(graph, order) -> dict:
    """{node: {role: parameter}} for the layers the plan made KFAC-family layers (hbpc.runtime computes their factors)."""
    return {name: dict(ir.node(graph, name).params) for name in order if ir.node(graph, name).plan.kronecker}
