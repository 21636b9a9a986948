"""What one ``NewtonCG`` step did: per-parameter solves (``ParamStats``) and the step as a whole (``StepStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamStats:
    """How one parameter's direction was found.

    ``fallback`` is ``None`` (the solver's answer was used), ``"best iterate"``
    (CG stopped early, at negative curvature or a growing residual, after some iterations) or
    ``"gradient"`` (``d = -g``). ``alpha`` is the damping used for this step.
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

    ``loss`` is the loss before the step (``None`` without a closure), ``loss_after`` the loss at the
    kept point (closure and a loss check only). ``scale`` is the factor ``t`` applied to ``s = lr · d``
    (``0`` when the step was undone or skipped), ``predicted`` the undamped model's change
    ``q(t s) = t gᵀs + ½ t² sᵀ B s`` (the blocks ``B``, or the full ``A``), ``rho`` the reduction
    ratio the damping followed (``None``: none). ``capped`` names the parameters whose step was
    shortened to ``max_step · max(‖θ‖, 1)``. ``backtracks`` counts the shrinks, ``accepted`` says whether the step was kept, ``skipped``
    why nothing moved (``None`` when something did).
    """

    params: dict[str, ParamStats] = field(default_factory=dict)
    loss: float | None = None
    loss_after: float | None = None
    predicted: float | None = None
    rho: float | None = None
    scale: float = 1.0
    backtracks: int = 0
    capped: list[str] = field(default_factory=list)
    accepted: bool = True
    skipped: str | None = None

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
