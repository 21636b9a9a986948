"""The implementations compared: hbpc and its peers BackPACK, curvlinops and torch.func.

Each implementation turns a quantity into timed phases (callables run in order) and, for the
value check, into comparable values. Quantities (``QUANTITIES``):

* ``blocks-ggn`` / ``blocks-hessian``: the HBP blocks with both averaging flags False, i.e.
  ``S_x = E[Jᵀ S J] + mode(Σ_n R_n)`` and ``B_θ = E[J_θᵀ S J_θ]`` (KFRA's recursion for ``ggn``).
  One phase, ``pass``: forward, backward and the blocks (every implementation's pass also fills
  ``p.grad``).
* ``products-<mode>``: exact diagonal-block curvature products. Phases ``setup`` (whatever pass
  the implementation needs first) and ``vector`` (one vector per parameter block, every block).
* ``full-<mode>``: full-network products over all parameters, same phases.
* ``kronecker-kflr``: KFLR's Kronecker factors of every Linear/Conv layer (hbpc's
  ``kronecker_factors("kflr")``, BackPACK's ``KFLR``). One phase, ``pass``, incl. the gradient.

An implementation that cannot compute a quantity raises ``Unsupported`` (shown as "n/a") or
``Pending`` (hbpc without the generated method yet).
"""
import copy
import warnings

import torch

QUANTITIES = {
    "blocks-ggn": ("HBP blocks, ggn, both flags False (= KFRA), incl. gradient", ("pass",)),
    "blocks-hessian": ("HBP blocks, hessian, both flags False, incl. gradient", ("pass",)),
    "products-ggn": ("exact GGN block products", ("setup", "vector")),
    "products-hessian": ("exact Hessian block products", ("setup", "vector")),
    "products-pch-abs": ("exact PCH-abs block products", ("setup", "vector")),
    "full-ggn": ("full GGN-vector product (all parameters)", ("setup", "vector")),
    "full-hessian": ("full Hessian-vector product (all parameters)", ("setup", "vector")),
    "kronecker-kflr": ("KFLR Kronecker factors (every Linear/Conv layer), incl. gradient", ("pass",)),
}


class Unsupported(Exception):
    """The implementation has no such quantity (a fact about the library, not a failure)."""


class Pending(Exception):
    """hbpc does not generate this quantity yet."""


def _mode(quantity):
    return quantity.split("-", 1)[1]


def _zero_grad(model):
    for p in model.parameters():
        p.grad = None


def _vectors(model, V, seed=1, dtype=None):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(V, *p.shape, generator=generator, dtype=dtype or p.dtype)
            for name, p in model.named_parameters()}


class Hbpc:
    """The generated ``Curvature`` of an hbpc-compiled module."""

    name = "hbpc"

    def __init__(self, module):
        self.module = module

    def phases(self, quantity, model, x, y, loss_fn):
        Curvature, mode = self.module.Curvature, _mode(quantity)
        if quantity.startswith(("blocks-", "kronecker-")):
            def run():
                _zero_grad(model)
                curvature = Curvature(model)
                curvature.forward_backward(x, y)
                if quantity.startswith("blocks-"):
                    curvature.blocks(mode, False, False)
                else:
                    curvature.kronecker_factors(mode)
            return {"pass": run}
        state, vectors = {}, _vectors(model, 1)
        if quantity.startswith("products-"):
            def setup():
                _zero_grad(model)
                curvature = Curvature(model)
                curvature.forward_backward(x, y)
                state["products"] = curvature.block_products(mode)

            def vector():
                for name, product in state["products"].items():
                    product(vectors[name])
            return {"setup": setup, "vector": vector}
        method = f"{mode}_vector_product"
        if not hasattr(Curvature, method):
            raise Pending(f"this hbpc does not generate {method} yet")
        listed = [vectors[name] for name, _ in model.named_parameters()]

        def setup():
            _zero_grad(model)
            state["curvature"] = Curvature(model)
            state["curvature"].forward_backward(x, y)

        def vector():
            getattr(state["curvature"], method)(listed)
        return {"setup": setup, "vector": vector}

    def values(self, quantity, model, x, y, loss_fn, vectors):
        """Blocks: {name: ("kron", (A, B)) | ("dense", M)}; products: {name: (V, *θ)}."""
        curvature = self.module.Curvature(model)
        curvature.forward_backward(x, y)
        mode = _mode(quantity)
        if quantity.startswith(("blocks-", "kronecker-")):
            out = {}
            blocks = curvature.blocks(mode, False, False) if quantity.startswith("blocks-") else \
                curvature.kronecker_factors(mode)
            for name, block in blocks.items():
                factors = block.kronecker_factors
                out[name] = ("kron", tuple(factors)) if factors is not None else ("dense", block.to_dense())
            return out
        if quantity.startswith("products-"):
            return {name: f(vectors[name]) for name, f in curvature.block_products(mode).items()}
        method = f"{mode}_vector_product"
        if not hasattr(curvature, method):
            raise Pending(f"this hbpc does not generate {method} yet")
        names = [name for name, _ in model.named_parameters()]
        return dict(zip(names, getattr(curvature, method)([vectors[n] for n in names])))


class BackPACK:
    """BackPACK 1.7's HBP extensions (KFRA, HBP) and curvature-matrix products (GGNMP, HMP, PCHMP).

    The HBP configuration matched to hbpc's ``blocks(mode, False, False)``:
    ``HBP(curv_type=mode, loss_hessian_strategy="sum", backprop_strategy="average",
    ea_strategy="E[J^T E(H) J]")``; for ``ggn`` that is exactly ``KFRA()``. ``"sum"`` starts the
    recursion at ``Σ_n ∇²_{z_n} L`` (hbpc's ``S_z``), ``"average"`` backpropagates one
    ``E[Jᵀ S J] + mode(Σ_n R_n)`` matrix per layer (average_input_jacobian=False), and
    ``E[J^T E(H) J]`` forms ``E[x xᵀ]`` for linear weights (average_parameter_jacobian=False;
    the other choice, ``E(J^T) E(H) E(J)``, is x̄ x̄ᵀ and raises for convolutions).
    """

    name = "BackPACK"
    def __init__(self):
        import backpack  # noqa: F401  (ImportError: not installed)

    def _extension(self, quantity):
        from backpack.extensions import GGNMP, HBP, HMP, KFLR, KFRA, PCHMP

        mode = _mode(quantity)
        if quantity == "kronecker-kflr":
            return "kflr", KFLR()
        if quantity.startswith("blocks-"):
            if mode == "ggn":
                return "kfra", KFRA()
            return "hbp", HBP(curv_type=mode, loss_hessian_strategy="sum", backprop_strategy="average",
                              ea_strategy="E[J^T E(H) J]", savefield="hbp")
        if quantity.startswith("products-"):
            if mode == "ggn":
                return "ggnmp", GGNMP()
            if mode == "hessian":
                return "hmp", HMP()
            if mode == "pch-abs":
                return "pchmp", PCHMP(modify="abs")
            raise Unsupported(f"no {mode} products in BackPACK")
        raise Unsupported("BackPACK has no full-network curvature products")

    def _extended(self, model, loss_fn):
        from backpack import extend

        return extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))

    def _backward(self, model, loss_fn, x, y, extension):
        from backpack import backpack

        _zero_grad(model)
        loss = loss_fn(model(x), y)
        with backpack(extension), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            loss.backward()

    def phases(self, quantity, model, x, y, loss_fn):
        savefield, extension = self._extension(quantity)
        model, loss_fn = self._extended(model, loss_fn)
        if quantity.startswith(("blocks-", "kronecker-")):
            return {"pass": lambda: self._backward(model, loss_fn, x, y, extension)}
        vectors = _vectors(model, 1)
        params = list(model.named_parameters())

        def vector():
            for name, p in params:
                getattr(p, savefield)(vectors[name])
        return {"setup": lambda: self._backward(model, loss_fn, x, y, extension), "vector": vector}

    def values(self, quantity, model, x, y, loss_fn, vectors):
        default = torch.get_default_dtype()
        torch.set_default_dtype(x.dtype)  # BackPACK's max-pool HBP allocates with torch.zeros(...)
        try:
            return self._values(quantity, model, x, y, loss_fn, vectors)
        finally:
            torch.set_default_dtype(default)

    def _values(self, quantity, model, x, y, loss_fn, vectors):
        savefield, extension = self._extension(quantity)
        model, loss_fn = self._extended(model, loss_fn)
        self._backward(model, loss_fn, x, y, extension)
        if quantity.startswith("products-"):
            return {name: getattr(p, savefield)(vectors[name]) for name, p in model.named_parameters()}
        out = {}
        for module_name, module in model.named_modules():
            for role, p in module.named_parameters(recurse=False):
                name = f"{module_name}.{role}" if module_name else role
                factors = getattr(p, savefield)
                conv_weight = isinstance(module, torch.nn.modules.conv._ConvNd) and role == "weight"
                if conv_weight and quantity.startswith("blocks-"):
                    out[name] = ("approx", "BackPACK's conv weight factors are KFC-style (output curvature summed "
                                           "over locations ⊗ E[unfold unfoldᵀ]), not E[J_θᵀ S J_θ]")
                elif len(factors) == 2:
                    out[name] = ("kron", tuple(f.contiguous() for f in factors))
                elif len(factors) == 1:
                    out[name] = ("dense", factors[0])
                else:
                    out[name] = ("approx", f"{len(factors)} factors")
        return out


class Curvlinops:
    """curvlinops' ``GGNLinearOperator`` (one per parameter: the block) and ``HessianLinearOperator``
    (``block_sizes`` of one parameter each). Every product re-runs the forward pass."""

    name = "curvlinops"

    def __init__(self):
        import curvlinops  # noqa: F401

    def _operators(self, quantity, model, x, y, loss_fn):
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        mode, params = _mode(quantity), list(model.named_parameters())
        kwargs = dict(check_deterministic=False, progressbar=False)
        data = [(x, y)]
        if quantity.startswith("blocks-"):
            raise Unsupported("curvlinops has no HBP/KFRA recursion (its KFAC is KFAC/KFLR)")
        if quantity.startswith("kronecker-"):
            raise Unsupported("curvlinops' KFAC operator is not compared here (other conventions for convolutions)")
        if mode not in ("ggn", "hessian"):
            raise Unsupported("curvlinops has no PCH")
        if quantity.startswith("products-") and mode == "ggn":
            return [([name], GGNLinearOperator(model, loss_fn, [p], data, **kwargs)) for name, p in params]
        names, tensors = [n for n, _ in params], [p for _, p in params]
        if quantity.startswith("products-"):
            return [(names, HessianLinearOperator(model, loss_fn, tensors, data, block_sizes=[1] * len(tensors),
                                                  **kwargs))]
        cls = GGNLinearOperator if mode == "ggn" else HessianLinearOperator
        return [(names, cls(model, loss_fn, tensors, data, **kwargs))]

    def phases(self, quantity, model, x, y, loss_fn):
        state, vectors = {}, _vectors(model, 1)

        def setup():
            state["operators"] = self._operators(quantity, model, x, y, loss_fn)

        def vector():
            for names, operator in state["operators"]:
                operator @ [vectors[n][0] for n in names]
        self._operators(quantity, model, x, y, loss_fn)  # raise Unsupported before any timing
        return {"setup": setup, "vector": vector}

    def values(self, quantity, model, x, y, loss_fn, vectors):
        out = {}
        for names, operator in self._operators(quantity, model, x, y, loss_fn):
            result = operator @ [vectors[n].movedim(0, -1) for n in names]
            out.update({n: r.movedim(-1, 0) for n, r in zip(names, result)})
        return out


class TorchFunc:
    """Hand-written ``torch.func`` products: J_θᵀ (∇²_z L) J_θ v by jvp, loss-Hessian jvp and vjp, and
    ∇²_θ L v by forward-over-reverse (``jvp`` of ``grad``); every product re-runs the forward pass."""

    name = "torch.func"

    def _functions(self, quantity, model, x, y, loss_fn):
        from torch.func import functional_call, grad, jvp, vjp

        if quantity.startswith(("blocks-", "kronecker-")):
            raise Unsupported("torch.func has no HBP recursion or Kronecker factors")
        mode = _mode(quantity)
        if mode not in ("ggn", "hessian"):
            raise Unsupported("no PCH in torch.func")
        params = {name: p.detach() for name, p in model.named_parameters()}

        def output(sub):
            return functional_call(model, {**params, **sub}, (x,))

        def loss_hvp(z, t):
            return jvp(grad(lambda out: loss_fn(out, y)), (z,), (t,))[1]

        def ggn(names, vs):
            f = lambda *ts: output(dict(zip(names, ts)))  # noqa: E731
            primals = tuple(params[n] for n in names)
            z, Jv = jvp(f, primals, tuple(vs))
            return vjp(f, *primals)[1](loss_hvp(z, Jv))

        def hessian(names, vs):
            L = lambda *ts: loss_fn(output(dict(zip(names, ts))), y)  # noqa: E731
            primals = tuple(params[n] for n in names)
            return jvp(grad(L, argnums=tuple(range(len(names)))), primals, tuple(vs))[1]

        product = ggn if mode == "ggn" else hessian
        if quantity.startswith("products-"):
            return [([name], product) for name in params]
        return [(list(params), product)]

    def phases(self, quantity, model, x, y, loss_fn):
        vectors, state = _vectors(model, 1), {}

        def setup():
            state["functions"] = self._functions(quantity, model, x, y, loss_fn)

        def vector():
            for names, product in state["functions"]:
                product(names, [vectors[n][0] for n in names])
        self._functions(quantity, model, x, y, loss_fn)
        return {"setup": setup, "vector": vector}

    def values(self, quantity, model, x, y, loss_fn, vectors):
        out = {}
        V = next(iter(vectors.values())).shape[0]
        for names, product in self._functions(quantity, model, x, y, loss_fn):
            columns = [product(names, [vectors[n][k] for n in names]) for k in range(V)]
            for i, n in enumerate(names):
                out[n] = torch.stack([column[i] for column in columns])
        return out


PEERS = {"BackPACK": BackPACK, "curvlinops": Curvlinops, "torch.func": TorchFunc}
IMPORTS = {"BackPACK": "backpack", "curvlinops": "curvlinops", "torch.func": "torch.func"}
ORDER = ("hbpc", "BackPACK", "curvlinops", "torch.func")


def relative_error(a, b):
    """max |a - b| / max |b| (absolute when b is zero)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(reference, peer):
    """Largest relative error over the entries the two share, and notes on what was not compared."""
    worst, notes = 0.0, []
    if set(reference) != set(peer):
        raise ValueError(f"parameters differ: {sorted(set(reference) ^ set(peer))}")
    for name in reference:
        ref, got = reference[name], peer[name]
        if isinstance(got, tuple) and got[0] == "approx":
            notes.append(f"{name}: not compared ({got[1]})")
            continue
        if isinstance(ref, tuple):
            if ref[0] == "kron" and got[0] == "kron":
                errors = [relative_error(a, b) for a, b in zip(ref[1], got[1])]
            else:
                dense_ref = torch.kron(*ref[1]) if ref[0] == "kron" else ref[1]
                dense_got = torch.kron(*got[1]) if got[0] == "kron" else got[1]
                errors = [relative_error(dense_ref, dense_got)]
            worst = max(worst, *errors)
        else:
            worst = max(worst, relative_error(ref, got))
    return worst, notes
