"""Independent float64 curvature references built from torch.autograd and torch.func only.

They implement the definitions of docs/curvature.md without importing hbpc:

* `hessian_block`, `ggn_block`: diagonal blocks of the true Hessian and of the GGN
  of the whole model, straight from autograd;
* `recursion_blocks`: the exact backward recursion `H_x = Jᵀ H_y J + mode(R)` on the
  whole batch (what `block_products(mode)` multiplies with);
* `hbp_blocks`: the HBP batch-averaged recursion with one per-sample-sized `S_y`
  per op (what `blocks(mode, ...)` returns), from per-sample Jacobians and residuals.

The recursions run op by op. A model is split into its ops by `torch.fx`, so
`nn.Sequential` children, nested custom modules and functional or method calls
(`F.relu`, `x.tanh()`, `x.view(x.size(0), -1)`, ...) each become one `Op`. Only
chain-shaped graphs are supported, and parametrized ops must be linear in their
parameters (linear, conv), so that parameters have no residual.

Every curvature is returned as a dense `(numel, numel)` matrix of `vec(θ)`
(row-major), for parameters named as in `model.named_parameters()`.
"""

import operator

import torch
from torch import fx, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, jacrev

MODES = ("hessian", "ggn", "pch-abs", "pch-clip")

_AUXILIARY = {("call_method", "size"), ("call_function", getattr), ("call_function", operator.getitem)}


class Op:
    """One op of a chain-shaped model: `y = op(x, **parameters)`.

    `parameters` maps the op's local parameter names (`"weight"`) to detached
    tensors, `names` maps them to the model's names (`"0.fc1.weight"`). Keyword
    arguments of `__call__` replace parameters, for differentiating w.r.t. them.
    """

    def __init__(self, graph_module: fx.GraphModule, node: fx.Node, previous: fx.Node):
        self.node = node
        self.previous = previous
        self.module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        local = dict(self.module.named_parameters()) if self.module is not None else {}
        self.parameters = {key: value.detach() for key, value in local.items()}
        self.names = {key: f"{node.target}.{key}" for key in local}

    def __call__(self, x: torch.Tensor, **parameters: torch.Tensor) -> torch.Tensor:
        args, kwargs = self._evaluate((self.node.args, self.node.kwargs), x)
        if self.module is not None:
            return functional_call(self.module, {**self.parameters, **parameters}, args, kwargs)
        return _call(self.node, args, kwargs)

    def _evaluate(self, arguments, x):
        """Substitute `x` for the chain input and evaluate auxiliary nodes (`x.size(0)`)."""

        def value(node):
            if node is self.previous:
                return x
            return _call(node, *self._evaluate((node.args, node.kwargs), x))

        return fx.node.map_arg(arguments, value)


def _call(node: fx.Node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def ops(model: nn.Module) -> list[Op]:
    """Split a chain-shaped model into its ops, in forward order.

    Auxiliary nodes (`x.size(0)`, `x.shape[0]`) are recomputed inside the op that
    uses them, and must derive from that op's input.
    """
    graph_module = fx.symbolic_trace(model)
    chain, roots = [], {}
    for node in graph_module.graph.nodes:
        inputs = {roots.get(arg, arg) for arg in node.all_input_nodes}
        if node.op == "placeholder":
            previous = node
        elif node.op == "output":
            if node.args[0] is not previous:
                raise ValueError(f"model output {node.args[0]} is not the end of the chain")
        elif (node.op, node.target) in _AUXILIARY:
            if len(inputs) != 1:
                raise ValueError(f"{node.format_node()} is not chain-shaped")
            roots[node] = inputs.pop()
        elif node.op in ("call_module", "call_function", "call_method"):
            if inputs != {previous}:
                raise ValueError(f"{node.format_node()} is not chain-shaped")
            chain.append(Op(graph_module, node, previous))
            previous = node
        else:
            raise ValueError(f"unsupported node {node.format_node()}")
    names = [full for op in chain for full in op.names.values()]
    if sorted(names) != sorted(dict(model.named_parameters())):
        raise ValueError(f"every parameter must belong to exactly one module call, got {names}")
    return chain


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"unknown curvature {mode!r}, expected one of {MODES}")


def apply_mode(residual: torch.Tensor, mode: str) -> torch.Tensor:
    """`mode(R)` for a symmetric `R`: kept, dropped, `|R|` or `max(R, 0)` via eigenvalues."""
    _check_mode(mode)
    if mode == "hessian":
        return residual
    if mode == "ggn":
        return torch.zeros_like(residual)
    eigenvalues, eigenvectors = torch.linalg.eigh((residual + residual.T) / 2)
    eigenvalues = eigenvalues.abs() if mode == "pch-abs" else eigenvalues.clamp(min=0)
    return (eigenvectors * eigenvalues) @ eigenvectors.T


def _jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """`∂ vec f(x) / ∂ vec x`, shape `(numel f(x), numel x)`."""
    return jacobian(f, x, vectorize=True).reshape(-1, x.numel())


def _hessian(f, x: torch.Tensor) -> torch.Tensor:
    """`∂² f(x) / ∂ vec x²` of a scalar `f`, shape `(numel x, numel x)`."""
    return hessian(f, x, vectorize=True).reshape(x.numel(), x.numel())


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def loss_value(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`L = loss_fn(model(x), t)`, detached."""
    with torch.no_grad():
        return loss_fn(model(x), t)


def hessian_block(model, loss_fn, x, t, name: str) -> torch.Tensor:
    """`∂²L / ∂vec(θ)²` for θ = parameter `name`, shape `(numel, numel)`."""
    parameters = _parameters(model)

    def loss(theta):
        return loss_fn(functional_call(model, {**parameters, name: theta}, (x,)), t)

    return _hessian(loss, parameters[name])


def ggn_block(model, loss_fn, x, t, name: str) -> torch.Tensor:
    """`Jᵀ (∇²_z L) J` with `J = ∂ vec z / ∂ vec θ` on the whole batch, shape `(numel, numel)`."""
    parameters = _parameters(model)

    def output(theta):
        return functional_call(model, {**parameters, name: theta}, (x,))

    theta = parameters[name]
    J = jacrev(output)(theta).reshape(-1, theta.numel())
    z = output(theta)
    H_z = _hessian(lambda z: loss_fn(z, t), z)
    return J.T @ H_z @ J


def _linearize(chain: list[Op], loss_fn, x, t):
    """Inputs `x_k`, outputs `y_k` and output gradients `g_k = ∂L/∂y_k` of every op."""
    inputs, outputs = [], []
    y = x.detach().requires_grad_()
    for op in chain:
        inputs.append(y)
        y = op(y)
        outputs.append(y)
    gradients = torch.autograd.grad(loss_fn(y, t), outputs)
    return [[tensor.detach() for tensor in tensors] for tensors in (inputs, outputs, gradients)]


def _first_parametrized(chain: list[Op]) -> int:
    return min(k for k, op in enumerate(chain) if op.parameters)


def recursion_blocks(model, loss_fn, x, t, mode: str = "ggn") -> dict[str, torch.Tensor]:
    """All diagonal blocks of the exact backward recursion on the whole batch.

    Start `H_z = ∇²_z L` (`(N·C, N·C)`). At op `y = f(x, θ)` with full-batch
    Jacobians `J_θ`, `J_x` and output gradient `g`:

        B_θ = J_θᵀ H_y J_θ,    H_x = J_xᵀ H_y J_x + mode(R),    R = ∂²(gᵀ f(x)) / ∂x².

    `R` is `(N·d_x, N·d_x)`, block-diagonal over samples. For `hessian` the blocks
    are `∇²L`'s, for `ggn` the GGN's, for `pch-*` the PCH's.
    """
    _check_mode(mode)
    chain = ops(model)
    inputs, outputs, gradients = _linearize(chain, loss_fn, x, t)
    H = _hessian(lambda z: loss_fn(z, t), outputs[-1])
    blocks = {}
    first = _first_parametrized(chain)
    for k in reversed(range(first, len(chain))):
        op, x_k, g = chain[k], inputs[k], gradients[k]
        for local, full in op.names.items():
            J = _jacobian(lambda theta: op(x_k, **{local: theta}), op.parameters[local])
            blocks[full] = J.T @ H @ J
        if k > first:
            J = _jacobian(op, x_k)
            R = _hessian(lambda x: (g * op(x)).sum(), x_k)
            H = J.T @ H @ J + apply_mode(R, mode)
    return {name: blocks[name] for name, _ in model.named_parameters()}


def recursion_block(model, loss_fn, x, t, name: str, mode: str = "ggn") -> torch.Tensor:
    """The block of parameter `name` from `recursion_blocks`, shape `(numel, numel)`."""
    return recursion_blocks(model, loss_fn, x, t, mode)[name]


def _sandwich(jacobians: list[torch.Tensor], S: torch.Tensor, average_jacobian: bool) -> torch.Tensor:
    """`E[J]ᵀ S E[J]` if `average_jacobian` else `(1/N) Σ_n J_nᵀ S J_n`."""
    if average_jacobian:
        J = torch.stack(jacobians).mean(0)
        return J.T @ S @ J
    return torch.stack([J.T @ S @ J for J in jacobians]).mean(0)


def hbp_blocks(
    model,
    loss_fn,
    x,
    t,
    mode: str = "ggn",
    average_input_jacobian: bool = True,
    average_parameter_jacobian: bool = True,
) -> dict[str, torch.Tensor]:
    """All HBP blocks of the batch-averaged recursion, per sample.

    Start `S_z = Σ_n ∇²_{z_n} L` (`(C, C)`). At op `y = f(x, θ)` with per-sample
    Jacobians `J_n = ∂y_n/∂x_n`, `J_{θ,n} = ∂y_n/∂θ` of the op applied to `x_n[None]`
    and per-sample residuals `R_n = ∂²(g_nᵀ f(x_n)) / ∂x_n²`:

        S_x = E[J]ᵀ S_y E[J]  (or (1/N) Σ_n J_nᵀ S_y J_n)  + mode(Σ_n R_n),
        B_θ = E[J_θ]ᵀ S_y E[J_θ]  (or (1/N) Σ_n J_{θ,n}ᵀ S_y J_{θ,n}).

    `S_x` is `(d_x, d_x)`. At `N = 1` the `hessian`/`ggn` blocks are exact.
    """
    _check_mode(mode)
    chain = ops(model)
    inputs, outputs, gradients = _linearize(chain, loss_fn, x, t)
    samples = range(x.shape[0])
    z = outputs[-1]

    def loss_of_sample(n):
        return lambda z_n: loss_fn(torch.cat([z[:n], z_n, z[n + 1 :]]), t)

    S = sum(_hessian(loss_of_sample(n), z[n : n + 1]) for n in samples)
    blocks = {}
    first = _first_parametrized(chain)
    for k in reversed(range(first, len(chain))):
        op = chain[k]
        x_n = [inputs[k][n : n + 1] for n in samples]
        g_n = [gradients[k][n : n + 1] for n in samples]
        for local, full in op.names.items():
            J_n = [_jacobian(lambda theta: op(x, **{local: theta}), op.parameters[local]) for x in x_n]
            blocks[full] = _sandwich(J_n, S, average_parameter_jacobian)
        if k > first:
            J_n = [_jacobian(op, x) for x in x_n]
            R = sum(_hessian(lambda x: (g * op(x)).sum(), x) for x, g in zip(x_n, g_n))
            S = _sandwich(J_n, S, average_input_jacobian) + apply_mode(R, mode)
    return {name: blocks[name] for name, _ in model.named_parameters()}


def hbp_block(
    model,
    loss_fn,
    x,
    t,
    name: str,
    mode: str = "ggn",
    average_input_jacobian: bool = True,
    average_parameter_jacobian: bool = True,
) -> torch.Tensor:
    """The block of parameter `name` from `hbp_blocks`, shape `(numel, numel)`."""
    blocks = hbp_blocks(model, loss_fn, x, t, mode, average_input_jacobian, average_parameter_jacobian)
    return blocks[name]
