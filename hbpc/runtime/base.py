"""``CurvatureModule``: the model-independent methods of every generated ``Curvature`` class.

A generated module subclasses it and declares its model in class attributes (the tables below); it adds only
what is specific to the model: ``forward_backward``'s straight-line forward, loss and backward with its
caches, the derivative methods of its nodes and the loss's derived products. The walkers here (the HBP sweep,
the exact products, the KFAC factors' backward) read the tables and call a node's methods through ``_method``.

A node's methods are shared by every node of its *family* (same rule, same derived code): ``_<family>_<suffix>
(self, node, ...)``, reading the node's parameters with ``param`` and its cached tensors with ``cached``; a node
of a kind that prints its own methods has ``_<node>_<suffix>(self, ...)`` instead (family None in NODES).
"""
import torch

from .blocks import (DenseBlock, KroneckerBlock, OperatorBlock, SumBlock, as_vectors, from_vectors, split_block,
                     split_product, zero_product)
from .checks import (bind, check_class_target, check_curvature, check_dense_target, check_eval_mode, check_flag,
                     check_input, check_kronecker_kind, check_model, check_samples, check_split, check_state,
                     check_token_target, tensor_state)
from .helpers import eigh_upcast, numel

TABLE_FORMAT = 2  # the layout of the tables below; a generated class states the one it was printed for


class CurvatureModule:
    """HBP blocks, exact block products, full GGN/Hessian/MC-Fisher products and Kronecker factors of one model.

    The generated subclass declares:

    ===================  =============================================================================
    PARAMETERS           {name: shape} in model order (as ``model.named_parameters()``)
    BUFFERS              buffer names forward_backward reads
    EVAL_MODE_MODULES    modules compiled as their eval-mode map ('*': functional dropout)
    INPUT_SHAPE          per-sample input shape; OUTPUT_SHAPE: per-sample logits' shape
    INPUT_IDS            None, or num_embeddings where x holds token ids (the model starts with an embedding)
    TARGET               'class' (labels, or probabilities if PROBABILITY_TARGETS) or 'dense'
    TOKENS               None, or cross-entropy over positions: {'class_axis': 1 or -1, 'ignore_index': int}
    LOSS                 the loss's name, for messages; SAMPLED_FISHER: a softmax likelihood (labels sampled)
    NODES                {node: (inputs, {role: parameter}, family or None)} in graph order; 'x' is the model
                         input
    SECOND_ORDER         {family or node: (has a residual, roles θ with ∂²y/∂x∂θ ≠ 0, method suffix viewing a
                         tangent as θ's input or None)}
    BLOCKS               nodes whose parameters get blocks: the ``<role>_block`` method builds one from S at node
    FACTORS              the KFAC family's layers (weight, optional bias); LOWERED: those caching the raw input
    WEIGHT_SHARING       {node: positions} of the FACTORS layers shared over positions (KFAC-expand / -reduce)
    MEMORY               (peak entries of the HBP sweep, where it peaks, ((b, gram), ...) factors kept)
    RUNTIME_FORMAT       the TABLE_FORMAT the class was printed for (checked when the class is defined)
    QUANTITIES           what forward_backward caches for: gradient, ggn (GGN and MC-Fisher products and blocks),
                         hessian (Hessian products, hessian/pch-* blocks), kronecker (kronecker_factors)
    ===================  =============================================================================
    """

    memory_limit = 2 * 1024**3  # bytes blocks() may allocate: curvature matrices, kept or temporary
    PARAMETERS, BUFFERS, EVAL_MODE_MODULES, INPUT_SHAPE, OUTPUT_SHAPE, INPUT_IDS = {}, (), (), (), (), None
    TARGET, PROBABILITY_TARGETS, LOSS, SAMPLED_FISHER, TOKENS = "class", False, "the loss", False, None
    NODES, SECOND_ORDER, BLOCKS, FACTORS, LOWERED, MEMORY, WEIGHT_SHARING = {}, {}, (), (), (), (0, "the loss", ()), {}
    QUANTITIES = ("gradient", "ggn", "hessian", "kronecker")

    def __init_subclass__(cls, **kwargs):
        """Refuse a generated class printed for another table layout (a module compiled by another hbpc)."""
        super().__init_subclass__(**kwargs)
        found = getattr(cls, "RUNTIME_FORMAT", None)
        if found != TABLE_FORMAT:
            raise ImportError(f"{cls.__module__}.{cls.__qualname__} was generated for hbpc.runtime table format {found} "
                              f"but this hbpc.runtime reads format {TABLE_FORMAT}: recompile the model with "
                              "`hbpc compile model.py -o <module>.py` (generated modules do not carry over between "
                              "hbpc versions)")

    def __init__(self, model):
        """Bind to a model of the compiled architecture; names and shapes must match.

        forward_backward re-reads the model's parameters and buffers, so replacing one on the model is picked up.
        """
        self.model = check_model(model)
        self.p, self.buffers = bind(model, self.PARAMETERS, self.BUFFERS)
        self._ready = False

    @property
    def factored_parameters(self):
        """kronecker_factors() keys."""
        return tuple(p for node in self.FACTORS for p in self.NODES[node][1].values())

    def _method(self, node, suffix):
        """The node's method ``suffix``: its family's ``_<family>_<suffix>`` bound to the node, or ``_<node>_<suffix>``."""
        family = self.NODES[node][2]
        if family is None:
            return getattr(self, f"_{node}_{suffix}")
        method = getattr(self, f"_{family}_{suffix}")
        return lambda *args: method(node, *args)

    def param(self, node, role):
        """The node's parameter in ``role`` ('weight', 'bias'), as bound by forward_backward."""
        return self.p[self.NODES[node][1][role]]

    def param_shape(self, node, role):
        return self.PARAMETERS[self.NODES[node][1][role]]

    def cached(self, node, what):
        """A tensor forward_backward cached for the node (``self.<node>_<what>``)."""
        return getattr(self, f"{node}_{what}")

    def set_cached(self, node, what, value):
        setattr(self, f"{node}_{what}", value)

    def _second_order(self, node):
        """(has a residual, coupled roles, tangent view suffix) of the node."""
        return self.SECOND_ORDER.get(self.NODES[node][2] or node, (False, (), None))

    def _upstream(self):
        """Nodes with a parameter at or upstream of them: those that carry gradients, tangents and curvature."""
        found = set()
        for name, (inputs, params, _) in self.NODES.items():
            if params or any(i in found for i in inputs):
                found.add(name)
        return found

    def _check_ready(self):
        if not self._ready:
            raise RuntimeError("call forward_backward(x, target) before asking for curvature")
        check_state(self._state)

    def _require(self, quantity, what):
        """Refuse a quantity the module was not compiled for (its caches are not kept)."""
        if quantity not in self.QUANTITIES:
            raise ValueError(f"{what} needs the {quantity!r} quantity, but this module was compiled for "
                             f"{', '.join(self.QUANTITIES)} only; recompile with quantities=(..., {quantity!r}) "
                             f"(hbpc compile --for {','.join(self.QUANTITIES)},{quantity})")

    def _require_curvature(self, curvature, what):
        self._require("ggn" if curvature == "ggn" else "hessian", f"{what} with curvature={curvature!r}")

    def check_current(self):
        """Raise RuntimeError unless forward_backward ran and no parameter, buffer, x or target changed since."""
        self._check_ready()

    def _begin(self, x, target):
        """forward_backward's argument checks: (N, the target as a tensor (N, C) or (N, *y)); binds the model."""
        check_eval_mode(self.model, self.EVAL_MODE_MODULES)
        params, buffers = bind(self.model, self.PARAMETERS, self.BUFFERS)  # the model's current tensors
        check_input(x, self.INPUT_SHAPE, next(iter(params.values()), None), self.INPUT_IDS)
        N = x.shape[0]
        if self.TOKENS:
            checked = check_token_target(target, N, self.OUTPUT_SHAPE, self.TOKENS, x.device)
        elif self.TARGET == "class":
            checked = check_class_target(target, N, numel(self.OUTPUT_SHAPE), self.PROBABILITY_TARGETS, x.device)
        else:
            checked = check_dense_target(target, N, self.OUTPUT_SHAPE, x.device)
        self.p, self.buffers, self.N = params, buffers, N
        self._ready = False  # a failure before _end leaves no half-updated cache in use
        return N, checked

    def _end(self, loss, x, target):
        """Record what the cache depends on; curvature calls are allowed from now on."""
        self._state = tensor_state(self.model, [("x", x), ("target", target)])
        self._ready = True
        return loss

    def blocks_memory(self):
        """Bytes blocks() holds at most at once (S matrices, what its blocks keep, each step's temporaries)."""
        self._check_ready()
        peak, _, factors = self.MEMORY
        classes = numel(self.OUTPUT_SHAPE)
        kept = sum(min(self.N, b) * b if gram else b * b for b, gram in factors)
        loss_hessian = 5 * self.N * classes * classes  # the loss Hessian's basis and its products
        lazy = [self.cached(name, "g").numel() for name in self.NODES
                if self._second_order(name)[0] and hasattr(self, f"{name}_r")]  # r = g ⊙ φ″, formed on first use (maybe in blocks())
        residuals = sum(lazy) + 3 * max(lazy, default=0)  # each kept, and φ″'s temporaries while one forms
        return (peak + loss_hessian + kept + residuals) * self.loss_z.element_size()

    def _check_memory(self):
        """Refuse blocks() before it allocates anything."""
        needed = self.blocks_memory()
        if needed > self.memory_limit:
            raise MemoryError(
                f"blocks() needs {needed / 2**30:.2f} GiB for the curvature at {self.MEMORY[1]}, more than "
                f"memory_limit ({self.memory_limit / 2**30:.2f} GiB); use block_products() or raise memory_limit"
            )

    @torch.no_grad()
    def blocks(self, curvature="ggn", average_input_jacobian=True, average_parameter_jacobian=True, split=1):
        """HBP blocks (the paper's batch-averaged recursion) keyed by parameter name.

        S as in _hbp_sweep; B_θ = E[J_θ]ᵀ S E[J_θ] (average_parameter_jacobian) or E[J_θᵀ S J_θ] with S at the
        output of θ's node. split > 1 keeps the diagonal sub-blocks over torch.chunk(θ, split, 0) (SplitBlock).
        """
        check_curvature(curvature)
        self._require_curvature(curvature, "blocks()")
        check_split(split)
        check_flag("average_input_jacobian", average_input_jacobian)
        check_flag("average_parameter_jacobian", average_parameter_jacobian)
        self._check_ready()
        self._check_memory()
        blocks = {}

        def visit(node, S):  # S at the output of node: its parameters' blocks; a tied parameter sums its uses
            for role, param in self.NODES[node][1].items():
                block = self._method(node, f"{role}_block")(S, average_parameter_jacobian)
                blocks[param] = SumBlock([blocks[param], block]) if param in blocks else block

        self._hbp_sweep(curvature, average_input_jacobian, visit)
        return {name: split_block(blocks.get(name) or OperatorBlock(torch.zeros_like, shape, self.loss_z), split)
                for name, shape in self.PARAMETERS.items()}  # a parameter the loss ignores: 0

    def block_products(self, curvature="ggn", split=1):
        """Exact diagonal-block products keyed by parameter name: v (θ or (V, *θ)) -> C_θθ v.

        split > 1 keeps the diagonal sub-blocks over torch.chunk(θ, split, 0) (SplitProduct, with .parts).
        """
        check_curvature(curvature)
        self._require_curvature(curvature, "block_products()")
        check_split(split)
        self._check_ready()
        used = {param for _, params, _ in self.NODES.values() for param in params.values()}
        products = {name: self._block_product(name) if name in used else zero_product for name in self.PARAMETERS}
        return {
            name: split_product(lambda v, f=f: f(v, curvature), self.PARAMETERS[name], split, self.loss_z,
                                self._check_ready)
            for name, f in products.items()
        }

    @torch.no_grad()
    def kronecker_factors(self, kind="kflr", samples=1, generator=None, kfac_approx="expand"):
        """Kronecker factors of the KFAC family for every Linear/Conv layer (one group, untied), keyed by parameter:
        weight B_W ≈ G ⊗ A (KroneckerBlock(G, A) on W viewed (C_out, d_k)), bias B_b ≈ G (DenseBlock).

        A = (1/N) Σ_n Σ_l x_l x_lᵀ over the input patches x_l of the output locations l (Linear: one).
        G = Σ_(v,n) s sᵀ, s = Σ_l u[v, n, :, l], u square-root factors backpropagated from the loss:
        kind='kflr': u_z = Q_n √Λ_n with ∇²_{z_n} L = Q_n Λ_n Q_nᵀ (exact); kind='kfac': u_z = √(c/S) ∇_z ℓ(z_n, ŷ),
        S labels ŷ ~ softmax(z_n) (Monte Carlo); kind='kfra': G = Σ_(l,l') S[(·,l),(·,l')] with S from the HBP
        recursion _hbp_sweep('ggn', average_input_jacobian=False). Other parameters are not in the dict.

        A layer shared over positions l (nn.Linear on (N, *S, D), WEIGHT_SHARING) follows Eschenhagen et al. (2023)
        with curvlinops' scaling: kfac_approx='expand' treats positions as samples, A = Σ_(n,l) x xᵀ / (N L),
        G = Σ_(v,n,l) u uᵀ (KFRA: Σ_l S[(l,·),(l,·)]); 'reduce' sums before the outer products, A = Σ_n x̄ x̄ᵀ / N with
        x̄ = mean_l x, G = Σ_(v,n) s sᵀ with s = Σ_l u (KFRA: Σ_(l,l') S). Other layers ignore kfac_approx.
        """
        check_kronecker_kind(kind)
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        self._require("kronecker", "kronecker_factors()")
        self._check_ready()
        if kind == "kfra":
            self._check_memory()
            G = {}

            def visit(node, S):  # S at the output of a node with parameters
                if node in self.FACTORS:
                    G[node] = self._curvature_factor(node, S, kfac_approx)

            self._hbp_sweep("ggn", False, visit)
        else:
            u = self._loss_hessian_root() if kind == "kflr" else self._loss_sampled_root(samples, generator)
            G = self._root_backward(u, kfac_approx) if self.FACTORS else {}
        factors = {}
        for node in self.FACTORS:
            params = self.NODES[node][1]
            A = self._input_factor(node, kfac_approx)
            factors[params["weight"]] = KroneckerBlock(G[node], A, self.param_shape(node, "weight"))
            if "bias" in params:
                factors[params["bias"]] = DenseBlock(G[node], self.param_shape(node, "bias"))
        return factors

    def _input_factor(self, node, approx):
        """A = (1/N) Σ_n Σ_l x_l x_lᵀ over the d_k inputs of each output location (the weight (C_out, *k)): (d_k, d_k).
        Shared over L positions (WEIGHT_SHARING): Σ_(n,l) x xᵀ / (N L) (expand), Σ_n x̄ x̄ᵀ / N, x̄ = mean_l x (reduce)."""
        X = self.cached(node, "X")
        if node in self.LOWERED:  # the raw input is cached: its patches are the rule's X
            X = self._method(node, "view")(X)
        if node in self.WEIGHT_SHARING:
            X = X.reshape(self.N, self.WEIGHT_SHARING[node], -1)  # (N, L, D)
            if approx == "reduce":
                X = X.mean(1)
                return X.T @ X / self.N
            return torch.einsum("nli,nlj->ij", X, X) / (self.N * self.WEIGHT_SHARING[node])
        X = X.reshape(self.N, numel(self.param_shape(node, "weight")[1:]), -1)
        return torch.einsum("nil,njl->ij", X, X) / self.N

    def _root_factor(self, node, u, approx):
        """G = Σ_(v,n) s sᵀ with s = Σ_l u[v, n, :, l], u (V, N, *y) square-root factors: (C_out, C_out).
        Shared over L positions (output (*S, C_out)): Σ_(v,n,l) u uᵀ (expand) or s = Σ_l u (reduce)."""
        c_out = self.param_shape(node, "weight")[0]
        if node in self.WEIGHT_SHARING:
            u = u.reshape(*u.shape[:2], self.WEIGHT_SHARING[node], c_out)
            if approx == "expand":
                return torch.einsum("vnlo,vnlp->op", u, u)
            s = u.sum(2)
        else:
            s = u.reshape(*u.shape[:2], c_out, -1).sum(-1)
        return torch.einsum("vno,vnp->op", s, s)

    def _curvature_factor(self, node, S, approx):
        """G = Σ_(l,l') S[(o, l), (p, l')] from the HBP curvature S (d_y, d_y) at the output: (C_out, C_out).
        Shared over L positions (S indexed (l, o)): Σ_l S[(l, o), (l, p)] (expand) or Σ_(l,l') (reduce)."""
        c_out = self.param_shape(node, "weight")[0]
        locations = S.shape[0] // c_out
        if node in self.WEIGHT_SHARING:
            S = S.reshape(locations, c_out, locations, c_out)
            return torch.diagonal(S, dim1=0, dim2=2).sum(-1) if approx == "expand" else S.sum((0, 2))
        return S.reshape(c_out, locations, c_out, locations).sum((1, 3))

    def _hbp_sweep(self, curvature, average_input_jacobian, visit):
        """S at every node output by the paper's batch-averaged recursion; visit(node, S) at each node in BLOCKS.

        S_z = Σ_n ∇²_{z_n} L; S_x = E[J]ᵀ S E[J] (average_input_jacobian) or E[Jᵀ S J], plus mode(Σ_n R_n).
        Where the graph branches, S is kept for every pair of live tensors (cross terms use E[J]): S[a, b] is
        the (d_a, d_b) cross curvature of a and b, a first in graph order; S[a, a] the curvature at a.
        """
        position = {name: k for k, name in enumerate(self.NODES)}
        upstream = self._upstream()
        last = next(reversed(self.NODES))
        S, frontier = {(last, last): self._loss_hessian_sum()}, [last]

        def add(a, b, term):  # S[a, b] += term, a (d_a, d_b) matrix, kept with a first
            key, term = ((a, b), term) if position[a] <= position[b] else ((b, a), term.T)
            S[key] = S[key] + term if key in S else term

        for name in reversed(self.NODES):
            if name not in upstream:
                continue
            frontier.remove(name)
            own = S[name, name]
            if name in self.BLOCKS:
                visit(name, own)
            active = [(i, source) for i, source in enumerate(self.NODES[name][0]) if source in upstream]
            for i, source in active:
                add(source, source, self._method(name, "input_curvature")(i, own, average_input_jacobian, curvature))
            for k, (i, a) in enumerate(active):
                for j, b in active[k + 1:]:
                    term = self._method(name, "cross")(i, j, own, curvature)  # E[J_i]ᵀ S E[J_j] (+ R_ij): (d_a, d_b)
                    add(a, b, term + term.T if a == b else term)
            for other in frontier:
                key = (name, other) if position[name] < position[other] else (other, name)
                if key not in S:
                    continue
                M = S[key] if key[0] == name else S[key].T  # (d_name, d_other)
                for i, source in active:
                    term = self._method(name, "mean_vjp")(i, M)  # E[J_i]ᵀ M: (d_source, d_other)
                    add(source, other, term + term.T if source == other else term)
            frontier += [source for source in dict.fromkeys(s for _, s in active) if source not in frontier]
            for other in [name, *frontier]:
                S.pop((name, other) if position[name] <= position[other] else (other, name), None)

    def _full_product(self, vs, product, *args):
        """product(v, *args) on {name: (V, *θ)} for vs a list shaped like the parameters (optionally with a V)."""
        self._check_ready()
        v, single = as_vectors(vs, self.PARAMETERS, self.loss_z)
        return from_vectors(product(v, *args), v, single)

    @torch.no_grad()
    def ggn_vector_product(self, vs):
        """G v = Jᵀ (∇²_z L) J v over all parameters (the generalized Gauss-Newton); vs is a list shaped like the
        parameters, optionally with a leading V."""
        self._require("ggn", "ggn_vector_product()")
        return self._full_product(vs, self._product, None, "ggn", self._loss_hessian_product)

    @torch.no_grad()
    def hessian_vector_product(self, vs):
        """H v = ∇²L v over all parameters: GGN plus every residual and parameter-input cross term; vs as for
        ggn_vector_product."""
        self._require("hessian", "hessian_vector_product()")
        return self._full_product(vs, self._product, "hessian", "hessian", self._loss_hessian_product)

    @torch.no_grad()
    def fisher_mc_vector_product(self, vs, samples=1, generator=None):
        """F v = Jᵀ (1/S Σ_s s sᵀ) J v with s = ∇_z ℓ(z, ŷ_s), labels ŷ_s ~ softmax(z) drawn per call; vs as for
        ggn_vector_product."""
        self._require_sampling("fisher_mc_vector_product", "use ggn_vector_product (the GGN it estimates)")
        self._require("ggn", "fisher_mc_vector_product()")
        check_samples(samples)

        def loss_product(t):
            return self._loss_fisher_product(t, samples, generator)

        return self._full_product(vs, self._product, None, "ggn", loss_product)

    def _block_product(self, name):
        """(v, curvature) -> C_θθ v for θ = name: the diagonal block by the exact recursion, (V, *θ) -> (V, *θ)."""
        return lambda v, curvature: self._product({name: v}, "curvature", curvature, self._loss_hessian_product)[name]

    def _jvp(self, name, tangents):
        """The node's output tangent from its inputs' tangents (None where an input has none)."""
        jvp = self._method(name, "jvp")
        return jvp(tangents[0]) if len(tangents) == 1 else jvp(tangents)

    def _vjps(self, name, inputs, u):
        """Jᵢᵀ u for every input i of the node."""
        vjp = self._method(name, "vjp")
        return [vjp(u)] if len(inputs) == 1 else vjp(u)

    def _product(self, v, second_order, curvature, loss_product):
        """C v for the parameters in v ({name: (V, *θ)}), on forward_backward's cache: {name: (V, *θ)}.

        Forward: t_out = Σ_i J_i t_i + Σ_θ J_θ v_θ; at the logits u = loss_product(t). Backward:
        u_in = Σ_consumers J_iᵀ u_out, plus second-order terms: ``second_order`` is None (GGN), "hessian" (every
        residual R t_in, for a node of two activations the joint residual's (R t)_i from the other input's tangent,
        and the parameter-input cross terms J_xᵀ(g; W ← v_W), J_θᵀ(g; X ← t_in)) or "curvature"
        (residuals under ``curvature``'s mode; the cross terms only for curvature = "hessian").
        """
        mode = "hessian" if second_order == "hessian" else curvature
        residuals, cross = second_order is not None and mode != "ggn", second_order is not None and mode == "hessian"
        tangent = {}
        for name, (inputs, params, _) in self.NODES.items():
            tangents = [tangent.get(i) for i in inputs]
            terms = [self._jvp(name, tangents)] if any(t is not None for t in tangents) else []
            terms += [self._method(name, f"{role}_jvp")(v[param], self.cached(name, "X"))
                      for role, param in params.items() if param in v]
            if terms:
                tangent[name] = _sum(terms)
        last = next(reversed(self.NODES))
        cotangent, out = {last: [loss_product(tangent[last])]}, {}
        for name in reversed(self.NODES):
            if name not in tangent:
                continue
            inputs, params, _ = self.NODES[name]
            u = _sum(cotangent[name])
            has_residual, coupled, view = self._second_order(name)
            input_tangent = tangent.get(inputs[0])
            for role, param in params.items():
                if param not in v:
                    continue
                vjp, X = self._method(name, f"{role}_vjp"), self.cached(name, "X")
                out.setdefault(param, []).append(vjp(u, X))
                if cross and role in coupled and input_tangent is not None:
                    viewed = self._method(name, view)(input_tangent) if view else input_tangent
                    out[param].append(vjp(self.cached(name, "g"), viewed))
            if not any(i in tangent for i in inputs):
                continue
            coupled_residuals = (self._method(name, "residual_products")([tangent.get(i) for i in inputs], mode)
                                 if residuals and has_residual and len(inputs) > 1 else [None] * len(inputs))
            for source, term, coupled_residual in zip(inputs, self._vjps(name, inputs, u), coupled_residuals):
                if source not in tangent:
                    continue
                terms = [term]
                if coupled_residual is not None:
                    terms.append(coupled_residual)
                elif residuals and has_residual and len(inputs) == 1:
                    terms.append(self._method(name, "residual_product")(tangent[source], mode))
                if cross and "weight" in coupled and params["weight"] in v:
                    terms.append(self._method(name, "vjp")(self.cached(name, "g"), v[params["weight"]]))
                cotangent.setdefault(source, []).append(_sum(terms))
        return {param: _sum(terms) for param, terms in out.items()}

    def _root_backward(self, u, kfac_approx):
        """Jᵀ u (V, N, *z) from the loss down to every KFAC-family layer; G = the layer's root factor there."""
        needed = set()
        for name, (inputs, _, _) in self.NODES.items():  # tensors with a factor layer at or below them
            if name in self.FACTORS or any(i in needed for i in inputs):
                needed.add(name)
        last = next(reversed(self.NODES))
        cotangent, G = {last: [u]}, {}
        for name in reversed(self.NODES):
            if name not in needed:
                continue
            inputs = self.NODES[name][0]
            u = _sum(cotangent[name])
            if name in self.FACTORS:
                G[name] = self._root_factor(name, u, kfac_approx)
            if any(i in needed for i in inputs):
                for source, term in zip(inputs, self._vjps(name, inputs, u)):
                    if source in needed:
                        cotangent.setdefault(source, []).append(term)
        return G

    def _loss_basis(self):
        """The identity on the logits, per sample: (C, N, *z)."""
        classes = numel(self.OUTPUT_SHAPE)
        eye = torch.eye(classes, dtype=self.loss_z.dtype, device=self.loss_z.device)
        return eye[:, None, :].expand(classes, self.N, classes).reshape(classes, self.N, *self.OUTPUT_SHAPE)

    def _token_view(self, a, to_tokens):
        """Cross-entropy over tokens: (*lead, *y) as (*lead, T, C) (to_tokens), or back."""
        rank, axis = len(self.OUTPUT_SHAPE), self.TOKENS["class_axis"]
        shape = self.OUTPUT_SHAPE[1:] + self.OUTPUT_SHAPE[:1] if axis == 1 else self.OUTPUT_SHAPE  # (*S, C)
        if to_tokens:
            a = a.movedim(-rank, -1) if axis == 1 else a
            return a.reshape(*a.shape[:-rank], numel(shape[:-1]), shape[-1])
        a = a.reshape(*a.shape[:-2], *shape)
        return a.movedim(-1, -rank) if axis == 1 else a

    def _token_loss_hessians(self):
        """∇²_{z_(n,t)} L per token, (N, T, C, C), from C products: the loss Hessian is block-diagonal over tokens."""
        C = self.OUTPUT_SHAPE[0 if self.TOKENS["class_axis"] == 1 else -1]
        T = numel(self.OUTPUT_SHAPE) // C
        eye = torch.eye(C, dtype=self.loss_z.dtype, device=self.loss_z.device)
        basis = self._token_view(eye[:, None, None, :].expand(C, self.N, T, C), False)
        return self._token_view(self._loss_hessian_product(basis), True).permute(1, 2, 0, 3)

    def _token_block_diagonal(self, blocks):
        """(*lead, T, C, K) per-token blocks -> (*lead, T, C, T, K) with zeros off the token diagonal."""
        T = blocks.shape[-3]
        full = blocks.new_zeros(*blocks.shape[:-1], T, blocks.shape[-1])
        index = torch.arange(T, device=blocks.device)
        full[..., index, :, index, :] = blocks.movedim(-3, 0)
        return full

    def _loss_hessian_sum(self):
        """S_z = Σ_n ∇²_{z_n} L: (C, C) (over tokens: block-diagonal, from the per-token Hessians)."""
        if self.TOKENS:
            S = self._token_block_diagonal(self._token_loss_hessians().sum(0))  # (T, C, T, C): tokens, then classes
            S = S.permute(1, 0, 3, 2) if self.TOKENS["class_axis"] == 1 else S  # the logits' order (C, T)
            return S.reshape(numel(self.OUTPUT_SHAPE), -1)
        classes = numel(self.OUTPUT_SHAPE)
        return self._loss_hessian_product(self._loss_basis()).sum(1).reshape(classes, classes)

    def _loss_hessian_root(self):
        """Q_n √Λ_n per sample, ∇²_{z_n} L = Q_n Λ_n Q_nᵀ (Λ clamped at 0): (C, N, *z), column first (over tokens: one
        eigendecomposition per token, T·C columns, each nonzero at its token only)."""
        if self.TOKENS:
            eigenvalues, Q = eigh_upcast(self._token_loss_hessians())  # (N, T, C, C)
            root = self._token_block_diagonal(Q * eigenvalues.clamp(min=0).sqrt()[..., None, :])  # (N, T, C, T, K)
            root = root.permute(3, 4, 0, 1, 2).reshape(-1, self.N, *root.shape[1:3])  # (T·K, N, T, C)
            return self._token_view(root, False)
        classes = numel(self.OUTPUT_SHAPE)
        H = self._loss_hessian_product(self._loss_basis()).reshape(classes, self.N, classes).transpose(0, 1)
        eigenvalues, Q = eigh_upcast(H)  # H: (N, C, C)
        root = Q * eigenvalues.clamp(min=0).sqrt()[:, None, :]
        return root.permute(2, 0, 1).reshape(classes, self.N, *self.OUTPUT_SHAPE)

    def _require_sampling(self, what, instead):
        if not self.SAMPLED_FISHER:
            raise ValueError(f"{what} samples labels from a softmax likelihood; {self.LOSS} has none: {instead}")

    def _loss_fisher_product(self, v, samples, generator):
        """(c/S) Σ_s s sᵀ v per sample with sampled labels: an unbiased estimate of ∇²_z L v; v (V, N, *z)."""
        s = self._loss_sampled_gradients(samples, generator)  # (N, S, C)
        flat = v.reshape(*v.shape[:2], -1)
        product = torch.einsum("nsc,...ns->...nc", s, torch.einsum("nsc,...nc->...ns", s, flat))
        return (self.loss_scale / samples * product).reshape(v.shape)

    def _loss_sampled_root(self, samples, generator):
        """√(c/S) s, the Monte Carlo square root of ∇²_z L per sample (E[u uᵀ] = ∇²_{z_n} L): (S, N, *z)."""
        self._require_sampling("kind='kfac'", "use kind='kflr' (exact factors) or 'kfra'")
        check_samples(samples)
        s = self._loss_sampled_gradients(samples, generator)
        return (self.loss_scale / samples) ** 0.5 * s.permute(1, 0, 2).reshape(samples, self.N, *self.OUTPUT_SHAPE)


def _sum(terms):
    """terms[0] + terms[1] + ... (no leading 0 +)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
