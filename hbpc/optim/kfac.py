"""K-FAC on the Kronecker factors of a generated ``Curvature`` (Martens & Grosse 2015; Grosse & Martens 2016).

Every Linear/Conv layer has factors ``B_W ≈ G ⊗ A`` and ``B_b ≈ G`` from
``curvature.kronecker_factors(kind)`` (``"kfac"``: sampled labels, ``"kflr"``: exact, ``"kfra"``: the
HBP recursion). One step, with ``t`` counting steps from 0:

* ``t % factor_interval == 0``: running averages ``F ← decay·F + (1 − decay)·F_new`` of every
  factor, starting from ``F = I`` (as the K-FAC implementation the paper used: early steps stay
  close to damped gradient steps);
* ``t % inverse_interval == 0``: eigendecompositions ``G = Q_G diag(λ_G) Q_Gᵀ``, ``A = Q_A diag(λ_A) Q_Aᵀ``
  (eigenvalues below ``1e-10`` set to 0);
* directions ``D_W = Q_G [(Q_Gᵀ ∇W Q_A) / (λ_G λ_Aᵀ + damping)] Q_Aᵀ`` (``∇W`` viewed ``(C_out, d_k)``) and
  ``d_b = Q_G [(Q_Gᵀ ∇b) / (λ_G + damping)]``; a parameter without factors keeps ``d = ∇θ``;
* KL clipping: ``ν = min(1, sqrt(kl_clip / (lr² Σ_θ ⟨d, ∇θ⟩)))``;
* heavy ball: ``m ← momentum·m + ν d + weight_decay·θ`` (the first step sets ``m``), ``θ ← θ − lr·m``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from hbpc.optim.newton_cg import check_choice, curvature_model, parameter_names

KINDS = ("kfac", "kflr", "kfra")
EIGENVALUE_FLOOR = 1e-10


class KFAC(torch.optim.Optimizer):
    """K-FAC with compiled Kronecker factors.

    Usage::

        curv = curv_model.Curvature(model)
        opt = KFAC(model.parameters(), curv, lr=0.1, damping=1e-3)
        loss = curv.forward_backward(x, y)   # fills p.grad, caches what the factors need
        opt.step()

    ``unpreconditioned`` names the optimized parameters without Kronecker factors (not in a Linear or
    one-group Conv layer, or tied); they follow momentum SGD on their gradient.
    """

    def __init__(
        self,
        params: Iterable,
        curvature,
        lr: float = 0.1,
        momentum: float = 0.9,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_interval: int = 10,
        inverse_interval: int = 100,
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        kind: str = "kfac",
        samples: int = 1,
        generator: torch.Generator | None = None,
    ):
        check_choice("kind", kind, KINDS)
        checks = {"lr": lr > 0, "damping": damping > 0, "momentum": 0 <= momentum < 1,
                  "factor_decay": 0 <= factor_decay < 1, "factor_interval": factor_interval >= 1,
                  "inverse_interval": inverse_interval >= 1, "weight_decay": weight_decay >= 0,
                  "samples": samples >= 1, "kl_clip": kl_clip is None or kl_clip > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={locals()[name]!r} is out of range")
        self.curvature, self.kind, self.samples, self.generator = curvature, kind, samples, generator
        self.factor_interval, self.inverse_interval, self.kl_clip = factor_interval, inverse_interval, kl_clip
        self.factor_decay = factor_decay
        self.names: dict[Tensor, str] = {}
        self.factors: dict[str, list[Tensor]] = {}  # parameter name -> [G] or [G, A], running averages
        self.eigen: dict[str, list[tuple[Tensor, Tensor]]] = {}  # parameter name -> [(λ, Q)] per factor
        self.steps = 0
        defaults = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self.names.update(parameter_names(curvature_model(self.curvature), params))
        super().add_param_group({**param_group, "params": params})

    @property
    def unpreconditioned(self) -> list[str]:
        """Optimized parameters that the compiled module has no Kronecker factors for."""
        factored = set(self.curvature.factored_parameters)
        return sorted(name for name in self.names.values() if name not in factored)

    def update_factors(self) -> None:
        """Fold the current batch's factors into the running averages."""
        fresh = self.curvature.kronecker_factors(self.kind, self.samples, self.generator)
        for name, block in fresh.items():
            new = list(block.kronecker_factors) if block.kronecker_factors is not None else [block.to_dense()]
            old = self.factors.get(name) or [torch.eye(len(n), dtype=n.dtype, device=n.device) for n in new]
            self.factors[name] = [self.factor_decay * o + (1.0 - self.factor_decay) * n for o, n in zip(old, new)]

    def update_inverses(self) -> None:
        """Eigendecompose every running factor."""
        for name, factors in self.factors.items():
            decompositions = []
            for F in factors:
                eigenvalues, Q = torch.linalg.eigh(F.to(torch.promote_types(F.dtype, torch.float32)))  # no half eigh
                eigenvalues, Q = eigenvalues.to(F.dtype), Q.to(F.dtype)
                decompositions.append((eigenvalues * (eigenvalues > EIGENVALUE_FLOOR), Q))
            self.eigen[name] = decompositions

    def direction(self, name: str, grad: Tensor, damping: float) -> Tensor:
        """The damped Kronecker-preconditioned gradient, or the gradient itself without factors."""
        if name not in self.eigen:
            return grad
        (lam_g, Q_g), *rest = self.eigen[name]
        if not rest:  # bias: G only
            return Q_g @ ((Q_g.T @ grad.reshape(-1)) / (lam_g + damping))
        (lam_a, Q_a), = rest
        V = Q_g.T @ grad.reshape(Q_g.shape[0], Q_a.shape[0]) @ Q_a
        return (Q_g @ (V / (lam_g[:, None] * lam_a[None, :] + damping)) @ Q_a.T).reshape(grad.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One K-FAC step on the gradients and cache of the latest ``forward_backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps % self.factor_interval == 0:
            self.update_factors()
        if self.steps % self.inverse_interval == 0:
            self.update_inverses()
        active = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        directions = [self.direction(self.names[p], p.grad, group["damping"]).reshape(p.shape) for group, p in active]
        nu = self.clip_factor(active, directions)
        for (group, p), d in zip(active, directions):
            update = nu * d + group["weight_decay"] * p if group["weight_decay"] else nu * d
            state = self.state[p]
            if "momentum_buffer" not in state or group["momentum"] == 0:
                state["momentum_buffer"] = update.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(update)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])
        self.steps += 1
        return loss

    def clip_factor(self, active: list, directions: list[Tensor]) -> float:
        """``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨d, ∇θ⟩)))``; 1 without clipping or for a non-positive sum."""
        if self.kl_clip is None:
            return 1.0
        total = sum(group["lr"] ** 2 * float((d * p.grad).sum()) for (group, p), d in zip(active, directions))
        return min(1.0, math.sqrt(self.kl_clip / total)) if total > 0 else 1.0
