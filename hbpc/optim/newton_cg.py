"""Block-diagonal Newton-CG (Dangel, Harmeling & Hennig, AISTATS 2020, Sec. 5).

For every parameter ``θ`` with gradient ``g`` and curvature block ``B`` (from a
generated ``Curvature``), one step solves the damped Newton system and moves::

    [(1 - α) B + α I] d = -g,        θ ← θ + lr · d

``α ∈ [0, 1)`` interpolates between Newton (``α = 0``) and gradient descent
(``α → 1``). Since ``(1 - α) B + α I = (1 - α)(B + λ I)`` with ``λ = α / (1 - α)``,
``solver="direct"`` calls ``block.solve(-g, λ) / (1 - α)``.

Full curvature (``source="full"``, Martens 2010): one CG solve over all parameters at once,
``[(1 - α) A + α I] d = -g`` with ``g`` and ``d`` stacking every parameter (``(n,)``) and ``A`` the
full GGN ``G = Jᵀ ∇²_z L J`` or Hessian ``∇²L`` restricted to the optimized parameters (the
principal submatrix; parameters without a gradient stay fixed). Each parameter then moves by its
group's ``lr`` times its part of ``d``.

Indefinite curvature (``hessian`` mode): CG stops at the first direction with
``pᵀ[(1 - α) B + α I] p <= 0`` and the step uses the last CG iterate, which is a
descent direction; if CG had made no iteration yet, it uses ``d = -g``. A direct
solve whose ``d`` is not a descent direction (``gᵀd >= 0`` proves the damped
block is not positive definite) also falls back to ``d = -g``. Both are reported
in ``last_stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from hbpc.linalg.operators import full_operator
from hbpc.optim.cg import cg, inner

CURVATURE_MODES = ("hessian", "ggn", "pch-abs", "pch-clip")
SOURCES = ("blocks", "block_products", "full")
SOLVERS = ("cg", "direct")
FULL_MODES = ("ggn", "hessian")
FULL = "full"  # StepStats.params key of the joint solve
SHARED = ("alpha", "cg_tol", "cg_atol", "cg_maxiter")  # one value for all groups when source="full"

BOOST, DECAY = 3.0 / 2.0, 2.0 / 3.0
RHO_LOW, RHO_HIGH = 0.25, 0.75


@dataclass(frozen=True)
class ParamStats:
    """How one parameter's direction was found.

    ``fallback`` is ``None`` (the solver's answer was used), ``"best iterate"``
    (CG stopped at negative curvature after some iterations) or ``"gradient"``
    (``d = -g``). ``alpha`` is the damping used for this step.
    """

    cg_iterations: int
    residual_norm: float
    converged: bool
    negative_curvature: bool
    fallback: str | None
    alpha: float
    reason: str


@dataclass
class StepStats:
    """Statistics of the latest ``NewtonCG.step``, keyed by parameter name (``source="full"``: one
    entry, ``"full"``, for the joint solve).

    ``loss`` is the loss before the step (``None`` without a closure). With
    adaptive damping, ``loss_after`` is the loss after the step, ``predicted``
    the model's change ``Σ_θ [gᵀs + ½ sᵀ B s]`` (``source="full"``: ``gᵀs + ½ sᵀ A s``
    over all parameters) for the step ``s = lr · d``, and
    ``rho = (loss_after - loss) / predicted`` the reduction ratio.
    """

    params: dict[str, ParamStats] = field(default_factory=dict)
    loss: float | None = None
    loss_after: float | None = None
    predicted: float | None = None
    rho: float | None = None

    @property
    def cg_iterations(self) -> int:
        """Total CG iterations over all parameters."""
        return sum(s.cg_iterations for s in self.params.values())

    @property
    def converged(self) -> bool:
        """Whether every solve converged (vacuously true for no parameters)."""
        return all(s.converged for s in self.params.values())

    @property
    def negative_curvature(self) -> bool:
        """Whether any block showed negative curvature."""
        return any(s.negative_curvature for s in self.params.values())

    @property
    def fallbacks(self) -> dict[str, str]:
        """Parameters whose step did not use the solver's answer, with the fallback used."""
        return {name: s.fallback for name, s in self.params.items() if s.fallback is not None}


def damped_matvec(product: Callable[[Tensor], Tensor], alpha: float) -> Callable[[Tensor], Tensor]:
    """``v -> (1 - α) B v + α v`` for ``product = v -> B v``."""
    return lambda v: (1.0 - alpha) * product(v) + alpha * v


def solve_cg(product, g: Tensor, alpha: float, tol: float, atol: float, maxiter: int) -> tuple[Tensor, ParamStats]:
    """Direction ``d ≈ -[(1 - α) B + α I]⁻¹ g`` by CG, with the negative-curvature fallback."""
    d, info = cg(damped_matvec(product, alpha), -g, tol=tol, atol=atol, maxiter=maxiter)
    stopped = info.reason not in ("converged", "maxiter")
    fallback = None if not stopped else ("best iterate" if info.iterations > 0 else "gradient")
    if fallback == "gradient":
        d = -g
    stats = ParamStats(
        info.iterations, info.residual_norm, info.converged, info.negative_curvature, fallback, alpha, info.reason
    )
    return d, stats


def solve_direct(block, g: Tensor, alpha: float) -> tuple[Tensor, ParamStats]:
    """Direction ``d = -block.solve(g, α / (1 - α)) / (1 - α)``, falling back to ``-g`` if not descent."""
    d = block.solve(-g, alpha / (1.0 - alpha)) / (1.0 - alpha)
    descent = bool(torch.isfinite(d).all()) and inner(g, d).item() < 0.0
    if not descent and bool(g.any()):
        return -g, ParamStats(0, math.inf, False, True, "gradient", alpha, "not a descent direction")
    residual = (g + (1.0 - alpha) * (block @ d) + alpha * d).norm().item()
    return d, ParamStats(0, residual, True, False, None, alpha, "direct")


def update_damping(alpha: float, rho: float) -> float:
    """Levenberg–Marquardt rule (Martens 2010) on ``λ = α / (1 - α)``; returns the new ``α = λ / (1 + λ)``.

    ``ρ < 1/4``: ``λ ← 3/2 λ``; ``ρ > 3/4``: ``λ ← 2/3 λ``; otherwise unchanged.
    """
    lam = alpha / (1.0 - alpha)
    if rho < RHO_LOW:
        lam *= BOOST
    elif rho > RHO_HIGH:
        lam *= DECAY
    return lam / (1.0 + lam)


def reduction_ratio(actual: float, predicted: float) -> float:
    """``ρ = actual / predicted``; ``-inf`` when the model predicts no decrease (``predicted >= 0``)."""
    return actual / predicted if predicted < 0.0 else -math.inf


class NewtonCG(torch.optim.Optimizer):
    """Newton-CG on the HBP curvature blocks of a generated ``Curvature``.

    Usage::

        curv = curv_model.Curvature(model)
        opt = NewtonCG(model.parameters(), curv, lr=0.1, alpha=0.02)
        loss = curv.forward_backward(x, y)   # fills p.grad, caches curvature inputs
        opt.step()                            # or opt.step(lambda: curv.forward_backward(x, y))

    Per parameter group: ``lr``, ``alpha`` (damping α ∈ [0, 1)), ``cg_tol``,
    ``cg_atol``, ``cg_maxiter`` (SciPy conventions, see ``hbpc.optim.cg``).

    Whole optimizer:

    * ``source="blocks"`` uses ``curvature.blocks(curvature_mode,
      average_input_jacobian, average_parameter_jacobian)[name]`` (products via
      ``block @ v``); ``source="block_products"`` uses the exact diagonal-block
      products ``curvature.block_products(curvature_mode)[name]``; ``source="full"``
      solves one system over all parameters with ``curvature.ggn_vector_product``
      or ``hessian_vector_product`` (``curvature_mode`` ``"ggn"`` or ``"hessian"``;
      all groups share α and the CG settings, ``lr`` may differ).
    * ``solver="cg"`` runs CG on the damped product; ``solver="direct"`` (blocks
      only) uses ``block.solve``.
    * ``split=k`` (blocks and block products; the paper's "parallel" modules) cuts every
      parameter into ``torch.chunk(θ, k, 0)`` row chunks and solves each chunk's system on the
      diagonal sub-block of its curvature separately (``last_stats`` keys ``"name[start:stop]"``).
    * ``adaptive_damping=True`` adapts α after every step with the reduction
      ratio ``ρ = (L(θ + s) - L(θ)) / Σ_θ [gᵀs + ½ sᵀ B s]``, ``s = lr · d``, of the
      undamped block-diagonal quadratic model (Martens 2010; for ``source="full"``
      the full model ``gᵀs + ½ sᵀ A s``): ``ρ < 1/4`` boosts
      ``λ = α / (1 - α)`` by 3/2, ``ρ > 3/4`` shrinks it by 2/3. The new α is
      written into each group's ``"alpha"``. This needs ``step(closure)``: the
      closure is called a second time after the update to measure ``L(θ + s)``
      on the same batch, which also refills ``p.grad`` at the new point.

    ``last_stats`` (a ``StepStats``) describes the latest step.
    """

    def __init__(
        self,
        params: Iterable,
        curvature,
        lr: float = 0.1,
        alpha: float = 0.02,
        cg_tol: float = 0.1,
        cg_atol: float = 0.0,
        cg_maxiter: int = 50,
        source: str = "blocks",
        curvature_mode: str = "pch-abs",
        average_input_jacobian: bool = True,
        average_parameter_jacobian: bool = True,
        solver: str = "cg",
        adaptive_damping: bool = False,
        split: int = 1,
    ):
        check_choice("source", source, SOURCES)
        check_choice("curvature_mode", curvature_mode, CURVATURE_MODES)
        check_choice("solver", solver, SOLVERS)
        if solver == "direct" and source != "blocks":
            raise ValueError('solver="direct" needs source="blocks": block products and full products have no solve()')
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"split={split!r} must be a positive int (row chunks per parameter)")
        if source == "full" and split != 1:
            raise ValueError('split needs source="blocks" or "block_products": the full system has no parameter blocks')
        if source == "full" and curvature_mode not in FULL_MODES:
            raise ValueError(f'source="full" needs curvature_mode "ggn" or "hessian", got {curvature_mode!r}')
        self.curvature = curvature
        self.source = source
        self.curvature_mode = curvature_mode
        self.average_input_jacobian = average_input_jacobian
        self.average_parameter_jacobian = average_parameter_jacobian
        self.solver = solver
        self.adaptive_damping = adaptive_damping
        self.split = split
        self.names: dict[Tensor, str] = {}
        self.last_stats = StepStats()
        defaults = dict(lr=lr, alpha=alpha, cg_tol=cg_tol, cg_atol=cg_atol, cg_maxiter=cg_maxiter)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (as ``torch.optim.Optimizer``), validating it and naming its parameters."""
        params = param_group["params"]
        group = {**param_group, "params": [params] if isinstance(params, Tensor) else list(params)}
        check_group({**self.defaults, **group}, self.adaptive_damping)
        if self.source == "full":
            check_shared(self.param_groups, {**self.defaults, **group})
        names = parameter_names(curvature_model(self.curvature), group["params"])
        super().add_param_group(group)
        self.names.update(names)

    def curvature_source(self) -> dict:
        """Blocks or block products for this step, keyed by parameter name."""
        split = {"split": self.split} if self.split != 1 else {}  # modules from before split keep working
        if self.source == "blocks":
            return self.curvature.blocks(
                self.curvature_mode, self.average_input_jacobian, self.average_parameter_jacobian, **split
            )
        return self.curvature.block_products(self.curvature_mode, **split)

    def direction(self, operator, g: Tensor, group: dict) -> tuple[Tensor, ParamStats]:
        """Damped Newton direction ``d`` for one parameter; ``operator`` is a Block or ``v -> B v``."""
        if self.solver == "direct":
            return solve_direct(operator, g, group["alpha"])
        product = as_product(operator, self.source)
        return solve_cg(product, g, group["alpha"], group["cg_tol"], group["cg_atol"], group["cg_maxiter"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Newton-CG step; returns the closure's loss (before the step) or ``None``."""
        if self.adaptive_damping and closure is None:
            raise ValueError("adaptive_damping=True needs step(closure) to re-evaluate the loss after the step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = StepStats(loss=None if loss is None else float(loss))
        active = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        solve = self.full_steps if self.source == "full" else self.block_steps
        steps, predicted = solve(active, stats)
        for p, s in steps:  # only now: the curvature may read parameters lazily
            p.add_(s)
        if self.adaptive_damping:
            self.adapt(closure, stats, predicted)
        self.last_stats = stats
        return loss

    def block_steps(self, active: list, stats: StepStats) -> tuple[list[tuple[Tensor, Tensor]], float]:
        """``[(p, lr · d)]`` from one solve per block, and the block-diagonal model's predicted change."""
        operators = self.curvature_source()
        predicted, steps = 0.0, []
        for group, p in active:
            name = self.names[p]
            g = p.grad.detach()
            d = self.split_direction(name, operators[name], g, group, stats)
            s = group["lr"] * d
            if self.adaptive_damping:
                predicted += quadratic_model(as_product(operators[name], self.source), g, s)
            steps.append((p, s))
        return steps, predicted

    def split_direction(self, name: str, operator, g: Tensor, group: dict, stats: StepStats) -> Tensor:
        """One solve per row chunk when the operator is split (has ``.parts``), else one for the parameter."""
        parts = getattr(operator, "parts", None)
        if parts is None:
            d, stats.params[name] = self.direction(operator, g, group)
            return d
        pieces = []
        for start, stop, part in parts:
            d, stats.params[f"{name}[{start}:{stop}]"] = self.direction(part, g[start:stop], group)
            pieces.append(d)
        return torch.cat(pieces, 0)

    def full_steps(self, active: list, stats: StepStats) -> tuple[list[tuple[Tensor, Tensor]], float]:
        """``[(p, lr · d)]`` from one CG solve ``[(1 - α) A + α I] d = -g`` over all ``active`` parameters.

        ``A`` is the full GGN or Hessian on the stacked parameters, ``(n, n)``; also returns the
        full model's predicted change ``gᵀs + ½ sᵀ A s``.
        """
        if not active:
            return [], 0.0
        params = [p for _, p in active]
        A = full_operator(self.curvature, self.curvature_mode, [self.names[p] for p in params])
        g = A.flatten([p.grad.detach() for p in params])
        shared = active[0][0]  # α and the CG settings are the same in every group (check_shared)
        d, stats.params[FULL] = solve_cg(A.matvec, g, shared["alpha"], shared["cg_tol"], shared["cg_atol"],
                                         shared["cg_maxiter"])
        steps = [group["lr"] * t for (group, _), t in zip(active, A.unflatten(d))]
        predicted = quadratic_model(A.matvec, g, A.flatten(steps)) if self.adaptive_damping else 0.0
        return list(zip(params, steps)), predicted

    def adapt(self, closure: Callable[[], Tensor], stats: StepStats, predicted: float) -> None:
        """Measure ``L(θ + s)`` with the closure, set ``ρ`` and update every group's α."""
        with torch.enable_grad():
            stats.loss_after = float(closure())
        stats.predicted = predicted
        stats.rho = reduction_ratio(stats.loss_after - stats.loss, predicted)
        for group in self.param_groups:
            group["alpha"] = update_damping(group["alpha"], stats.rho)


def as_product(operator, source: str) -> Callable[[Tensor], Tensor]:
    """``v -> B v`` from a ``Block`` (``source="blocks"``) or a block-product callable."""
    return (lambda v: operator @ v) if source == "blocks" else operator


def quadratic_model(product: Callable[[Tensor], Tensor], g: Tensor, s: Tensor) -> float:
    """Predicted change ``gᵀs + ½ sᵀ B s`` of one block's undamped quadratic model."""
    return inner(g, s).item() + 0.5 * inner(s, product(s)).item()


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_group(group: dict, adaptive_damping: bool) -> None:
    """Validate one parameter group's hyper-parameters."""
    alpha = group["alpha"]
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha} is out of range, need 0 <= alpha < 1")
    if adaptive_damping and alpha == 0.0:
        raise ValueError("adaptive_damping=True needs alpha > 0: the damping rule scales alpha/(1-alpha)")
    if group["lr"] <= 0.0:
        raise ValueError(f"lr={group['lr']} must be positive")


def check_shared(groups: list[dict], group: dict) -> None:
    """``source="full"`` solves one system: a new group must share α and the CG settings with the others."""
    for other in groups:
        different = [key for key in SHARED if other[key] != group[key]]
        if different:
            raise ValueError(f'source="full" solves one system for all parameters, so every group needs the '
                             f'same {", ".join(different)} (only lr may differ)')


def parameter_names(model: torch.nn.Module, params: list[Tensor]) -> dict[Tensor, str]:
    """Map each of ``params`` (by identity) to its name in ``model.named_parameters()``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    for p in params:
        if id(p) not in by_id:
            raise ValueError(
                f"params: a parameter of shape {tuple(p.shape)} is not in curvature.model.named_parameters(); "
                "NewtonCG can only optimize the parameters of the model the Curvature is bound to"
            )
    return {p: by_id[id(p)] for p in params}


def curvature_model(curvature) -> torch.nn.Module:
    """The model a compiled ``Curvature`` is bound to; ``TypeError`` for anything else (e.g. the model itself)."""
    model = getattr(curvature, "model", None) if hasattr(curvature, "forward_backward") else None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"curvature must be a compiled Curvature bound to the model (curv_model.Curvature(model)), "
                        f"got {type(curvature).__name__}")
    return model
