"""K-FAC on the Kronecker factors of a generated ``Curvature`` (Martens & Grosse 2015; Grosse & Martens 2016).

Every Linear/Conv layer has factors ``B_W ≈ G ⊗ A`` and ``B_b ≈ G`` from
``curvature.kronecker_factors(kind)`` (``"kfac"``: sampled labels, ``"kflr"``: exact, ``"kfra"``: the
HBP recursion). One step, with ``t`` counting steps from 0:

* ``t % factor_interval == 0``: running averages ``F ← decay·F + (1 − decay)·F_new`` of every
  factor; the first update sets ``F = F_new``;
* ``t % inverse_interval == 0``: what the directions apply is refreshed from the running factors;
* directions ``Δ = −(G ⊗ A + D)⁻¹ ∇θ`` (``∇W`` viewed ``(C_out, d_k)``); a parameter without factors has
  ``Δ = −∇θ``. The damping ``D``:

  - ``relative_damping=True`` (default): factored Tikhonov damping in each factor's own units,
    ``(G + √γ ḡ I) ⊗ (A + √γ ā I)`` with ``ḡ, ā`` the factors' mean eigenvalues and ``γ = damping``
    (bias: ``G + γ ḡ I``). This is Martens & Grosse's π-corrected split (Sec. 6.3,
    ``π² = ā / ḡ``) of a per-layer ``λ = γ ḡ ā``. Two Cholesky inverses per layer, no eigendecomposition.
    An absolute ``λ`` cannot serve every layer of the sigmoid c4d3 (exp08): its ``λ_G`` range from 1e-12
    in the first convolution to 1e-1 at the output, so ``damping=1e-3`` turns every layer but the last
    into a gradient step (which stays on the plateau, as SGD does).
  - ``relative_damping=False`` (the K-FAC implementation the HBP paper used): ``λ_G λ_Aᵀ + damping`` in the
    eigenbases of ``G`` and ``A`` (eigendecompositions; negative round-off eigenvalues set to 0).

Two ways to turn ``Δ`` into an update ``u`` (``θ ← θ + lr·u``):

* ``step_size="quadratic"`` (default; Martens & Grosse 2015, Sec. 6.4 and 7): ``u = α Δ + μ u_prev``
  with ``(α, μ)`` minimising the exact damped GGN model of the current batch,
  ``q(u) = ∇θᵀu + ½ uᵀ(G + (λ + weight_decay) I)u + weight_decay θᵀu`` (``λ`` per layer: ``damping``,
  relative ``γ ḡ ā``), a 2×2 system from one ``ggn_vector_product`` on the two vectors (``μ = 0`` on the
  first step). The factors pick the direction, the exact curvature its length. ``kl_clip`` caps
  ``½ lr² uᵀ(G + λ I)u`` (the predicted KL change of the predictive distribution). ``momentum`` is not used.
* ``step_size="fixed"`` (the paper's K-FAC): KL clipping ``ν = min(1, sqrt(kl_clip / (lr² Σ_θ ⟨Δ, ∇θ⟩)))``
  and heavy ball ``m ← momentum·m + ν(−Δ) + weight_decay·θ``, ``u = −m``.

The GGN model holds only near ``θ``. Where a layer's curvature is tiny (the sigmoid c4d3's convolutions),
its natural-gradient direction is huge in parameter units: a step the model calls safe saturates the
sigmoids and kills the layer. ``max_change`` (default 0.1) is a per-tensor trust region in parameter space:
``‖lr·u_θ‖ ≤ max_change · max(‖θ‖, 0.01 √n_θ)`` (``u_θ`` shrunk to meet it; the shrunk update is the next
step's ``u_prev``). With it, the defaults leave exp08's plateau (see README, "KFAC").
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from hbpc.linalg.operators import check_choice
from hbpc.optim.newton_cg import curvature_model, parameter_names

KINDS = ("kfac", "kflr", "kfra")
STEP_SIZES = ("quadratic", "fixed")


class KFAC(torch.optim.Optimizer):
    """K-FAC with compiled Kronecker factors.

    Usage::

        curv = curv_model.Curvature(model)
        opt = KFAC(model.parameters(), curv)
        loss = curv.forward_backward(x, y)   # fills p.grad, caches what the factors and G v need
        opt.step()

    ``unpreconditioned`` names the optimized parameters without Kronecker factors (not in a Linear or
    one-group Conv layer, or tied); their direction is the negative gradient.
    """

    def __init__(
        self,
        params: Iterable,
        curvature,
        lr: float = 1.0,
        momentum: float = 0.9,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_interval: int = 10,
        inverse_interval: int = 10,
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        kind: str = "kfac",
        samples: int = 1,
        generator: torch.Generator | None = None,
        step_size: str = "quadratic",
        relative_damping: bool = True,
        max_change: float | None = 0.1,
    ):
        check_choice("kind", kind, KINDS)
        check_choice("step_size", step_size, STEP_SIZES)
        checks = {"lr": lr > 0, "damping": damping > 0, "momentum": 0 <= momentum < 1,
                  "factor_decay": 0 <= factor_decay < 1, "factor_interval": factor_interval >= 1,
                  "inverse_interval": inverse_interval >= 1, "weight_decay": weight_decay >= 0,
                  "samples": samples >= 1, "kl_clip": kl_clip is None or kl_clip > 0,
                  "max_change": max_change is None or max_change > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={locals()[name]!r} is out of range")
        self.curvature, self.kind, self.samples, self.generator = curvature, kind, samples, generator
        self.factor_interval, self.inverse_interval, self.kl_clip = factor_interval, inverse_interval, kl_clip
        self.factor_decay, self.step_size, self.relative_damping = factor_decay, step_size, relative_damping
        self.max_change = max_change
        self.names: dict[Tensor, str] = {}
        self.factors: dict[str, list[Tensor]] = {}  # parameter name -> [G] or [G, A], running averages
        self.eigen: dict[str, list[tuple[Tensor, Tensor]]] = {}  # absolute damping: name -> [(λ, Q)] per factor
        self.inverses: dict[str, list[Tensor]] = {}  # relative damping: name -> damped inverse per factor
        self.scales: dict[str, float] = {}  # relative damping: name -> ḡ·ā (bias ḡ)
        self.steps = 0
        self.last_alpha_mu: tuple[float, float] | None = None  # (α, μ) of the latest quadratic step
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
        """Fold the current batch's factors into the running averages (the first batch sets them)."""
        fresh = self.curvature.kronecker_factors(self.kind, self.samples, self.generator)
        for name, block in fresh.items():
            new = list(block.kronecker_factors) if block.kronecker_factors is not None else [block.to_dense()]
            old = self.factors.get(name)
            self.factors[name] = new if old is None else [
                self.factor_decay * o + (1.0 - self.factor_decay) * n for o, n in zip(old, new)]

    def update_inverses(self) -> None:
        """Refresh what ``direction`` applies: damped factor inverses (relative) or eigendecompositions."""
        damping = {self.names[p]: group["damping"] for group in self.param_groups for p in group["params"]}
        for name, factors in self.factors.items():
            work = [F.to(torch.promote_types(F.dtype, torch.float32)) for F in factors]  # no half kernels
            means = [float(F.diagonal().mean()) or 1.0 for F in work]  # ḡ, ā (mean eigenvalues); 1 if F = 0
            gamma = damping.get(name, self.defaults["damping"])
            if self.relative_damping:
                shift = gamma if len(work) == 1 else math.sqrt(gamma)
                self.inverses[name] = [damped_inverse(F, shift * m).to(F0.dtype)
                                       for F, m, F0 in zip(work, means, factors)]
                self.scales[name] = math.prod(means)
            else:
                decompositions = []
                for F, F0 in zip(work, factors):
                    eigenvalues, Q = torch.linalg.eigh(F)
                    decompositions.append((eigenvalues.to(F0.dtype).clamp(min=0), Q.to(F0.dtype)))
                self.eigen[name] = decompositions

    def model_damping(self, name: str, damping: float) -> float:
        """The Tikhonov term of ``name`` in the quadratic model: ``damping``; relative ``damping·ḡ·ā`` (bias ``·ḡ``)."""
        return damping * self.scales.get(name, 1.0) if self.relative_damping else damping

    def direction(self, name: str, grad: Tensor, damping: float) -> Tensor:
        """The damped Kronecker-preconditioned gradient ``(G ⊗ A + D)⁻¹ ∇θ`` (``∇θ`` for a parameter without
        factors).

        Relative: ``(G + √damping ḡ I)⁻¹ ∇W (A + √damping ā I)⁻¹`` (bias ``(G + damping ḡ I)⁻¹ ∇b``), with the
        inverses of the latest ``update_inverses``. Absolute:
        ``Q_G [(Q_Gᵀ ∇W Q_A) / (λ_G λ_Aᵀ + damping)] Q_Aᵀ``.
        """
        if self.relative_damping:
            if name not in self.inverses:
                return grad
            G_inverse, *rest = self.inverses[name]
            if not rest:
                return (G_inverse @ grad.reshape(-1)).reshape(grad.shape)
            return (G_inverse @ grad.reshape(G_inverse.shape[0], -1) @ rest[0]).reshape(grad.shape)
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
        directions = [self.trust_region(p, -self.direction(self.names[p], p.grad, group["damping"]), group["lr"])
                      for group, p in active]
        if self.step_size == "quadratic":
            updates = self.quadratic_updates(active, directions)
        else:
            updates = self.fixed_updates(active, directions)
        for (group, p), u in zip(active, updates):
            u = self.trust_region(p, u, group["lr"])
            self.state[p]["update"] = u
            p.add_(u, alpha=group["lr"])
        self.steps += 1
        return loss

    def trust_region(self, p: Tensor, u: Tensor, lr: float) -> Tensor:
        """``u`` shrunk to ``‖lr·u‖ ≤ max_change · max(‖p‖, 0.01 √numel)`` (unchanged without ``max_change``)."""
        if self.max_change is None:
            return u
        limit = self.max_change * max(float(p.norm()), 1e-2 * math.sqrt(p.numel()))
        size = lr * float(u.norm())
        return u * (limit / size) if size > limit else u

    def fixed_updates(self, active: list, directions: list[Tensor]) -> list[Tensor]:
        """Heavy ball on the KL-clipped directions: ``u = −m``, ``m ← momentum·m − νΔ + weight_decay·θ``."""
        nu = self.clip_factor(active, directions)
        updates = []
        for (group, p), d in zip(active, directions):
            step = -nu * d + group["weight_decay"] * p if group["weight_decay"] else -nu * d
            state = self.state[p]
            if "momentum_buffer" not in state or group["momentum"] == 0:
                state["momentum_buffer"] = step.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(step)
            updates.append(-state["momentum_buffer"])
        return updates

    def clip_factor(self, active: list, directions: list[Tensor]) -> float:
        """``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨−Δ, ∇θ⟩)))``; 1 without clipping or for a non-positive sum."""
        if self.kl_clip is None:
            return 1.0
        total = sum(group["lr"] ** 2 * float((-d * p.grad).sum()) for (group, p), d in zip(active, directions))
        return min(1.0, math.sqrt(self.kl_clip / total)) if total > 0 else 1.0

    def quadratic_updates(self, active: list, directions: list[Tensor]) -> list[Tensor]:
        """``u = α Δ + μ u_prev`` minimising the exact damped GGN model (see the module docstring).

        With ``M = [[Δᵀ C Δ, Δᵀ C u_prev], [·, u_prevᵀ C u_prev]]``, ``C = G + (damping + weight_decay) I``
        and ``b = [∇ᵀΔ, ∇ᵀu_prev]`` (``∇`` including ``weight_decay·θ``): ``(α, μ) = −M⁻¹ b``; on a
        singular or indefinite ``M`` only ``α = −b₀ / M₀₀`` (``μ = 0``); a non-positive ``M₀₀`` leaves
        ``u = Δ``. Trust region: when ``½ lr² uᵀ C u > kl_clip`` (the predicted KL divergence of the
        predictive distributions for cross-entropy), ``(α, μ)`` shrink to meet it.
        """
        previous = [self.state[p].get("update") for _, p in active]
        vectors = [directions] if any(u is None for u in previous) else [directions, previous]
        curved = self.damped_ggn(active, vectors)
        grads = [p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad for group, p in active]
        k = len(vectors)
        M = torch.tensor([[sum(float((a * b).sum()) for a, b in zip(vectors[i], curved[j])) for j in range(k)]
                          for i in range(k)], dtype=torch.float64)
        b = torch.tensor([sum(float((g * v).sum()) for g, v in zip(grads, vs)) for vs in vectors], dtype=torch.float64)
        alpha, mu = 1.0, 0.0
        if k == 2 and torch.linalg.det(M) > 1e-12 * M[0, 0] * M[1, 1] and M[1, 1] > 0:
            alpha, mu = (-torch.linalg.solve(M, b)).tolist()
        elif M[0, 0] > 0:
            alpha = float(-b[0] / M[0, 0])
        coefficients = torch.tensor([alpha, mu] if k == 2 else [alpha], dtype=torch.float64)
        kl = 0.5 * self.param_groups[0]["lr"] ** 2 * float(coefficients @ M @ coefficients)
        if self.kl_clip is not None and kl > self.kl_clip:
            shrink = math.sqrt(self.kl_clip / kl)
            alpha, mu = alpha * shrink, mu * shrink
        self.last_alpha_mu = (alpha, mu)
        if k == 1:
            return [alpha * d for d in directions]
        return [alpha * d + mu * u for d, u in zip(directions, previous)]

    def damped_ggn(self, active: list, vectors: list[list[Tensor]]) -> list[list[Tensor]]:
        """``[(G + (damping + weight_decay) I) v for v in vectors]`` over the active parameters (one GGN product)."""
        position = {self.names[p]: i for i, (_, p) in enumerate(active)}
        stacked = []
        for name, p in self.curvature.model.named_parameters():
            i = position.get(name)
            stacked.append(torch.stack([vs[i] for vs in vectors]) if i is not None
                           else p.new_zeros(len(vectors), *p.shape))
        products = self.curvature.ggn_vector_product(stacked)
        by_name = dict(zip((name for name, _ in self.curvature.model.named_parameters()), products))
        out = []
        for j, vs in enumerate(vectors):
            out.append([by_name[self.names[p]][j]
                        + (self.model_damping(self.names[p], group["damping"]) + group["weight_decay"]) * v
                        for (group, p), v in zip(active, vs)])
        return out


def damped_inverse(F: Tensor, shift: float) -> Tensor:
    """``(F + shift I)⁻¹`` of a PSD ``F`` by Cholesky (an eigendecomposition with clamped eigenvalues if that fails)."""
    damped = F + shift * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    L, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    eigenvalues, Q = torch.linalg.eigh(F)
    return (Q / (eigenvalues.clamp(min=0) + shift)) @ Q.T
