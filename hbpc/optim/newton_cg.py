"""Newton-CG on the curvature of a generated ``Curvature`` (Dangel, Harmeling & Hennig, AISTATS 2020,
Sec. 5; the safeguards follow Martens 2010, Hessian-free optimization).

For every parameter ``θ`` with gradient ``g`` and curvature block ``B`` one step solves the damped
Newton system, and the parameters move by a scaled step::

    [(1 - α) B + α I] d = -g,        s = lr · d,        θ ← θ + t · s

``α ∈ [0, 1)`` interpolates between Newton (``α = 0``) and gradient descent (``α → 1``). Since
``(1 - α) B + α I = (1 - α)(B + λ I)`` with ``λ = α / (1 - α)``, ``solver="direct"`` calls
``block.solve(-g, λ) / (1 - α)``. The paper's update is ``t = 1`` with fixed ``α`` (``PAPER``).

Full curvature (``source="full"``, Martens 2010): one CG solve over all parameters at once,
``[(1 - α) A + α I] d = -g`` with ``g`` and ``d`` stacking every parameter (``(n,)``) and ``A`` the
full GGN ``G = Jᵀ ∇²_z L J`` or Hessian ``∇²L`` restricted to the optimized parameters (the
principal submatrix; parameters without a gradient stay fixed). Each parameter then moves by its
group's ``lr`` times its part of ``d``.

Safeguards (defaults on; ``PAPER`` turns them off):

* line search on the full GGN model (``line_search=True``; ``None``: only in the plain loop, where
  no loss can be checked): ``t = min(1, -gᵀs / sᵀ[(1 - α) G + α I] s)``, the minimiser along ``s`` of
  the damped full-network GGN model, for one ``ggn_vector_product`` per step. Block-diagonal
  curvature ignores the coupling between layers (block Newton steps on an FCNN overshoot about
  twofold), and HBP blocks with averaged Jacobians can understate the curvature by orders of
  magnitude (a small CNN went from loss 2.34 to 2.2e7 without it); the full GGN sees both. Skipped
  for ``source="full"``, whose CG minimises that model.
* Levenberg–Marquardt damping (``adaptive_damping=True``) on ``λ`` from a reduction ratio ``ρ``:
  ``ρ < 1/4``: ``λ ← 3/2 λ``, ``ρ > 3/4``: ``λ ← 2/3 λ``, ``λ`` kept in ``[LAMBDA_MIN, LAMBDA_MAX]``.
  With a loss check (``step(closure)``), ``ρ = (L(θ + t s) - L(θ)) / q(t s)`` with ``q(s) = gᵀs + ½ sᵀ C s``:
  ``C`` the full GGN when the line search measured ``sᵀ G s`` (Martens 2010's model, and no further product),
  else the undamped model whose solve gave ``d`` (the blocks, or the full ``A``). Without a loss check,
  ``ρ = sᵀ B s / sᵀ G s``: the blocks' curvature along the step relative to the
  full GGN's, which the line search measures anyway (1 when they agree; the line search fixes the
  length, the damping the direction). With neither (``source="full"`` in the plain loop) ``α``
  stays. ``α`` never adapts below ``min_alpha``.
* acceptance (``max_backtracks``, needs a closure): a step stays only if the loss does not rise,
  ``L(θ + t s) <= L(θ)``; otherwise ``t ← t / 4`` up to ``max_backtracks`` times (a closure call
  each), then the step is undone and ``ρ = -∞`` boosts the damping. ``None``: no loss check.
* failures: a non-finite gradient or loss moves nothing; a solver answer that is not finite, not a
  descent direction (``gᵀd >= 0``), or worse than ``d = 0`` (residual above ``‖g‖``, as a direct
  solve of a singular block gives, or one that raises ``LinAlgError``) is replaced by ``d = -g``; CG
  keeps its smallest-residual iterate and stops at numerically zero curvature (``hbpc.optim.cg``). Indefinite curvature (``hessian``): CG
  stops at the first direction with ``pᵀ[(1 - α) B + α I] p <= 0`` and uses its last iterate, a
  descent direction (``-g`` before the first iteration). All reported in ``last_stats``.
* step cap (``max_step``, default ``MAX_STEP``; ``None`` turns it off): no parameter moves by more
  than ``max_step · max(‖θ‖, 1)`` in one step (an undamped solve on a nearly singular block otherwise
  moved a weight to 3e33).
* divergence warning (``RuntimeWarning``, once): when the loss or a gradient is not finite, or the
  loss exceeds ``DIVERGENCE`` times the first step's loss; a capped step gets its own warning (once), except
  when a loss check follows the step (a closure and ``max_backtracks``), which catches a bad step anyway.
  Both name the settings to change.

Speed (each measured in ``bench/newton_cg_speed.py``):

* ``warm_start=True``: CG starts from ``WARM_DECAY`` times the previous step's direction (dropped by
  ``cg`` when its model value is not below zero).
* ``preconditioner``: ``"diagonal"`` uses ``diag((1 - α) B̃ + α I)``, ``"kronecker"`` inverts
  ``(1 - α) (A ⊗ B) + α I`` through eigendecompositions of the factors, with ``B̃ = A ⊗ B`` the HBP
  block of the same curvature (``"ggn"`` for ``"hessian"``, which may be indefinite) from
  ``curvature.blocks``, formed once per step; a block without Kronecker factors uses its diagonal
  when it is dense, else none; none at all when ``blocks`` refuses (its ``memory_limit``).
* ``cg_maxiter``: the cap on CG iterations per solve.
* ``SubsampledCurvature(curvature, size)``: the gradient on the whole batch, curvature on ``size`` samples.
* ``curvature_every=k`` (``solver="direct"``): blocks and their factorizations (``EigenBlock``) are formed every ``k``
  steps and reused in between with the new gradient (K-FAC's stale inverses, Martens & Grosse 2015); the damping ``α``
  reaches the solves when the blocks are re-formed. With ``relative_damping`` the solves use the damped factors'
  explicit inverses (Cholesky, one per distinct matrix: a Linear layer's bias block is its weight's output factor),
  so a reused step costs two products per layer, ``(A + √λ a I)⁻¹ X (B + √λ b I)⁻¹``, and a thin input factor
  ``B = R Rᵀ`` needs only ``R``'s SVD. Profile of a step of the FCNN (batch 128, 1 thread, loaded machine): with the
  eigenbases' four rotations per layer 0.38 s against Adam's 0.05 s (rotations 0.14 s, eigendecompositions 0.07 s
  amortised); with the inverses 0.30 s against 0.037 s, of which the solves about half (the first layer's
  ``(A + √λ a I)⁻¹ X``, ``1024 × 1024 × 784``, costs more than a forward-backward pass at this batch: the fixed cost
  that a larger batch amortises), two forward-backward passes a fifth, the line search's GGN product a seventh.

Where things live: ``NewtonCG`` (this module) takes the step and its loss checks; ``hbpc.optim.presets`` holds the
defaults and the presets ``PAPER`` and ``KRONECKER``; ``hbpc.optim.safeguards`` the damping rule and the finiteness and
descent checks; ``hbpc.optim.solves`` the per-parameter solves and ``EigenBlock``; ``hbpc.optim.preconditioners`` the
CG preconditioners; ``hbpc.optim.stats`` ``ParamStats`` and ``StepStats``.

Relative damping (``relative_damping=True``, ``solver="direct"``): an absolute ``λ`` swamps the tiny curvature of
the early layers of a sigmoid network (mean eigenvalue 5e-8 in the FCNN's first layer against 2e-2 in its last),
so their step is a gradient step. Instead each block is damped in its own units, ``A ⊗ B + D_λ = (A + √λ a I) ⊗
(B + √λ b I)`` with ``a, b`` the factors' mean eigenvalues (dense blocks: ``B + λ tr(B)/n I``); see
``EigenBlock.solve_relative`` and the preset ``KRONECKER``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

from hbpc.linalg.operators import check_choice, full_operator
from hbpc.optim.cg import inner
from hbpc.optim.preconditioners import block_preconditioner
from hbpc.optim.presets import (AUTO, DEFAULT_ALPHA, DEFAULT_CG_MAXITER, DEFAULT_LR, DEFAULT_MIN_ALPHA,
                                DEFAULT_PRECONDITIONER, DEFAULT_WARM_START, KRONECKER_LR, KRONECKER_MODE,
                                PRODUCTS_MODE)
from hbpc.optim.safeguards import BACKTRACK, DIVERGENCE, MAX_STEP, is_finite, reduction_ratio, update_damping
from hbpc.optim.solves import EigenBlock, as_product, damping_scale, quadratic, solve_cg, solve_direct
from hbpc.optim.stats import ParamStats, StepStats

__all__ = ["NewtonCG", "curvature_model", "parameter_names"]

CURVATURES = ("hessian", "ggn", "pch-abs", "pch-clip")
SOURCES = (AUTO, "blocks", "block_products", "full")
KRONECKER_BLOCKS, PRODUCTS = "kronecker", "block products"  # NewtonCG.mode under source="auto"
SOLVERS = ("cg", "direct")
PRECONDITIONERS = (None, "diagonal", "kronecker")
FULL_CURVATURES = ("ggn", "hessian")
FULL = "full"  # StepStats.params key of the joint solve
SHARED = ("alpha", "cg_tol", "cg_atol", "cg_maxiter")  # one value for all groups when source="full"

DENSE_LIMIT = 2048  # the Kronecker mode's largest dense block (rows); beyond it block products (solvable)
WARM_DECAY = 0.95  # warm_start: CG starts from this times the previous direction


class NewtonCG(torch.optim.Optimizer):
    """Newton-CG on the curvature of a generated ``Curvature``.

    Usage (defaults need no tuning)::

        curv = curv_model.Curvature(model)
        opt = NewtonCG(model.parameters(), curv)
        opt.step(lambda: curv.forward_backward(x, y))   # loss checks, backtracking
        # or: curv.forward_backward(x, y); opt.step()    # model-based safeguards only

    Per parameter group: ``lr``, ``alpha`` (damping α ∈ [0, 1)), ``cg_tol``,
    ``cg_atol``, ``cg_maxiter`` (SciPy conventions, see ``hbpc.optim.cg``).

    Whole optimizer:

    * ``source="blocks"`` uses ``curvature.blocks(curvature, average_input_jacobian,
      average_parameter_jacobian)[name]`` (products via ``block @ v``); ``source="block_products"``
      uses the exact diagonal-block products ``curvature.block_products(curvature)[name]``;
      ``source="full"`` solves one system over all parameters with ``curvature.ggn_vector_product``
      or ``hessian_vector_product`` (``curvature`` ``"ggn"`` or ``"hessian"``; all groups share α
      and the CG settings, ``lr`` may differ).
    * ``solver="cg"`` runs CG on the damped product; ``solver="direct"`` (blocks only) uses ``block.solve``.
    * ``split=k`` (blocks and block products; the paper's "parallel" modules) cuts every
      parameter into ``torch.chunk(θ, k, 0)`` row chunks and solves each chunk's system on the
      diagonal sub-block of its curvature separately (``last_stats`` keys ``"name[start:stop]"``).
    * ``relative_damping``, ``curvature_every``: block-relative damping and reused factorizations (module
      docstring; preset ``KRONECKER``).
    * ``adaptive_damping``, ``min_alpha``, ``line_search``, ``max_backtracks``, ``max_step``,
      ``warm_start``, ``preconditioner``: the safeguards and speed-ups of the module docstring; ``**PAPER`` turns them all off. The
      adapted α is written into each group's ``"alpha"``.

    Defaults, and why (figures: ``bench/time_to_target.py``, ``bench/newton_cg_speed.py``, ``bench/README.md``):

    * ``source="auto"`` by default: it chooses per step, and says which in ``mode``:

      - ``"kronecker"`` (``presets.KRONECKER_MODE``: HBP blocks with per-sample parameter Jacobians, ``pch-abs``,
        direct solves through damped factor inverses kept for 5 steps, damping relative to each block's scale) when
        the step has a closure (its loss checks), ``curvature.blocks`` fits its ``memory_limit`` and every block is
        Kronecker-factored or dense of at most ``DENSE_LIMIT`` rows (``solvable``). On the sigmoid FCNN it needs
        13-37 steps to 0.60 test accuracy where Adam needs 210-257; in wall-clock time 0.74x Adam's in a pilot (one
        seed, load 5-7) and 1.13-1.53x (batch 128; best batch per seed 1.13-1.21x) in the three-seed run at load
        10-12 (``bench/RESULTS-time-to-target.md``);
      - ``"block products"`` (``presets.PRODUCTS_MODE``: CG on the exact diagonal GGN block products) otherwise: in
        the plain loop, where without loss checks the Kronecker steps diverged on the small user models of
        ``tests/test_newton_cg_defaults.py``, and once ``blocks()`` refused (for memory: the ReLU c4d3 on
        Fashion-MNIST at batch 128, 2.12 GiB > 2 GiB; or a dense convolution block: the example CNN's 12800 × 12800,
        whose inverse took minutes), from then on. On the FCNN this mode stays on the plateau (0.107 test accuracy
        after 73 steps of batch 512), which is why it is no longer the default.

      Options given explicitly apply to both; one that the Kronecker mode cannot use (``solver="cg"``, a
      ``preconditioner``, ``split``, or ``PAPER``'s switched-off loss checks and line search) leaves only the
      block products. An explicit ``source`` means that source with the block products' other options.
    * ``source="block_products"``, ``curvature="ggn"`` (the block products mode): the exact diagonal GGN blocks. They are
      positive semi-definite (no indefinite fallbacks), exact (HBP blocks with averaged Jacobians
      understate a convolution's curvature by orders of magnitude: the CNN that diverged), and need
      no ``blocks()`` memory (which c4d3 on CIFAR-10 exceeds at the default ``memory_limit``).
      ``source="full"`` is the more accurate solve (cross-layer coupling) at about one gradient per
      CG iteration instead of one per sweep over all blocks.
    * ``lr=None``: 2 in the Kronecker mode (``KRONECKER_LR``), 1 in the others (``DEFAULT_LR``); an ``lr`` given
      applies to every mode. The line search and the loss check shorten the step to the full GGN's minimiser along
      it (``t``), so ``lr`` only bounds the step at twice the blocks' Newton step; on the FCNN the Kronecker mode
      with ``lr=1`` did not reach 0.60 test accuracy in 50 steps where ``lr=2`` took 16 (batch-order seed 0).
    * ``alpha=0.1``, ``adaptive_damping=True``, ``min_alpha=0.1``: ``ρ`` on the step's own mini-batch trusts that batch: on the
      FCNN (batch 128) it drove α to 1e-8 and the test loss rose while each batch's fell; α ≥ 0.1 kept
      it learning (test loss after 60 steps 2.398 at α → 1e-8, 2.348 / 2.324 / 2.319 / 2.316 with
      floors 0.01 / 0.05 / 0.1 / 0.3). Full-batch or convex problems want ``min_alpha=0``.
    * ``cg_tol=0.1``, ``cg_maxiter=10``: loose solves (Martens 2010). On the FCNN the exact blocks
      converge in one or two iterations each (caps 5, 20, 100: the same losses and times); on the
      sigmoid CNN a cap of 5 instead of 20 halved the step time (0.54 against 0.96 s) at the same
      accuracy after 60 steps (0.766 against 0.771); 10 keeps some room for harder blocks.
    * ``line_search=True``, ``max_backtracks=2``: exact block-diagonal steps overshoot (about twofold
      on the FCNN); the full-GGN line search shortens them for one product, and loss checks catch
      the rest where there is a closure. ``max_step=10``: a last guard against singular solves.
    * ``warm_start=False``, ``preconditioner=None``: both solve the same systems (tested) but did not
      pay at these tolerances, where one or two CG iterations per block leave little to save. Seconds
      per step, FCNN / sigmoid CNN (batch 128, 60 steps, one loaded core): no option 0.27 / 0.96,
      warm start 0.35 / 0.98, diagonal 0.32 / 5.3, Kronecker 1.7 / 4.2 (``blocks()`` and its
      eigendecompositions every step), with no better loss.
    * Not a default, since it needs the batch: ``SubsampledCurvature(curvature, 0.25)`` cut the CNN's
      step to 0.30 s at accuracy 0.755 after 60 steps (0.771 on the whole batch).

    ``last_stats`` (a ``StepStats``) describes the latest step.
    """

    def __init__(
        self,
        params: Iterable,
        curv,
        /,
        lr: float | None = None,
        alpha: float = DEFAULT_ALPHA,
        cg_tol: float = 0.1,
        cg_atol: float = 0.0,
        cg_maxiter: int = DEFAULT_CG_MAXITER,
        source: str = AUTO,
        curvature: str | None = None,
        average_input_jacobian: bool = True,
        average_parameter_jacobian: bool | None = None,
        solver: str | None = None,
        adaptive_damping: bool = True,
        line_search: bool | None = True,
        max_backtracks: int | None = 2,
        max_step: float | None = MAX_STEP,
        min_alpha: float = DEFAULT_MIN_ALPHA,
        warm_start: bool = DEFAULT_WARM_START,
        preconditioner: str | None = DEFAULT_PRECONDITIONER,
        split: int = 1,
        relative_damping: bool | None = None,
        curvature_every: int | None = None,
    ):
        check_choice("source", source, SOURCES)
        given = {key: value for key, value in dict(curvature=curvature, average_parameter_jacobian=average_parameter_jacobian,
                                                   solver=solver, relative_damping=relative_damping,
                                                   curvature_every=curvature_every).items() if value is not None}
        if source != AUTO:
            self.modes = {source: {**PRODUCTS_MODE, **given, "source": source}}
        else:
            self.modes = {KRONECKER_BLOCKS: {**KRONECKER_MODE, **given}, PRODUCTS: {**PRODUCTS_MODE, **given}}
            try:
                self.check_options(**self.modes[KRONECKER_BLOCKS], preconditioner=preconditioner, split=split)
                if max_backtracks is None or line_search is False:
                    raise ValueError("the Kronecker mode was measured with its loss checks and line search")
            except ValueError:  # the options given exclude it (e.g. solver="cg", a preconditioner, split, PAPER)
                del self.modes[KRONECKER_BLOCKS]
        self.check_options(**self.modes[PRODUCTS if source == AUTO else source], preconditioner=preconditioner,
                           split=split)
        if not 0.0 <= min_alpha < 1.0:
            raise ValueError(f"min_alpha={min_alpha!r} is out of range, need 0 <= min_alpha < 1")
        if max_step is not None and not max_step > 0.0:
            raise ValueError(f"max_step={max_step!r} must be None or positive")
        if max_backtracks is not None and (not isinstance(max_backtracks, int) or max_backtracks < 0):
            raise ValueError(f"max_backtracks={max_backtracks!r} must be None or an int >= 0")
        self.curvature = curv
        self.average_input_jacobian = average_input_jacobian
        self.adaptive_damping = adaptive_damping
        self.line_search_option = line_search
        self.max_backtracks = max_backtracks
        self.max_step = max_step
        self.min_alpha = min_alpha
        self.warm_start = warm_start
        self.preconditioner = preconditioner
        self.split = split
        self.mode = None
        self.use(next(iter(self.modes)))
        self.names: dict[Tensor, str] = {}
        self.last_stats = StepStats()
        self.first_loss: float | None = None
        self.warned = set()  # headlines already warned about
        defaults = dict(lr=lr, alpha=alpha, cg_tol=cg_tol, cg_atol=cg_atol, cg_maxiter=cg_maxiter)
        super().__init__(params, defaults)

    @staticmethod
    def check_options(source: str, curvature: str, average_parameter_jacobian: bool, solver: str,
                      relative_damping: bool, curvature_every: int, preconditioner: str | None, split: int) -> None:
        """Validate one way of solving (``source`` and the options it reads)."""
        check_choice("curvature", curvature, CURVATURES)
        check_choice("solver", solver, SOLVERS)
        check_choice("preconditioner", preconditioner, PRECONDITIONERS)
        if solver == "direct" and source != "blocks":
            raise ValueError('solver="direct" needs source="blocks": block products and full products have no solve()')
        if relative_damping and (solver != "direct" or split != 1):
            raise ValueError('relative_damping=True needs solver="direct" and split=1 (the scale is the block\'s trace)')
        if not isinstance(curvature_every, int) or curvature_every < 1:
            raise ValueError(f"curvature_every={curvature_every!r} must be a positive int (steps per curvature)")
        if curvature_every != 1 and solver != "direct":
            raise ValueError('curvature_every > 1 needs solver="direct" (it reuses the blocks\' eigendecompositions)')
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"split={split!r} must be a positive int (row chunks per parameter)")
        if source == "full" and split != 1:
            raise ValueError('split needs source="blocks" or "block_products": the full system has no parameter blocks')
        if source == "full" and curvature not in FULL_CURVATURES:
            raise ValueError(f'source="full" needs curvature "ggn" or "hessian", got {curvature!r}')
        if preconditioner is not None and (split != 1 or solver == "direct"):
            raise ValueError(f"preconditioner={preconditioner!r} needs solver=\"cg\" and split=1")

    def use(self, mode: str) -> None:
        """Solve the next steps as ``self.modes[mode]`` says; a new mode forgets the kept blocks."""
        if mode == self.mode:
            return
        options = self.modes[mode]
        self.mode, self.source, self.kind, self.solver = mode, options["source"], options["curvature"], options["solver"]
        self.average_parameter_jacobian = options["average_parameter_jacobian"]
        self.relative_damping, self.curvature_every = options["relative_damping"], options["curvature_every"]
        self.line_search = self.line_search_option if self.source != "full" else False  # CG minimises that model
        self.cached: dict | None = None
        self.formed = False  # whether this step formed the blocks (reused_source)
        self.steps_taken = 0

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (as ``torch.optim.Optimizer``), validating it and naming its parameters."""
        params = param_group["params"]
        group = {**param_group, "params": [params] if isinstance(params, Tensor) else list(params)}
        check_group({**self.defaults, **group})
        if self.source == "full":
            check_shared(self.param_groups, {**self.defaults, **group})
        names = parameter_names(curvature_model(self.curvature), group["params"])
        super().add_param_group(group)
        self.names.update(names)

    def curvature_source(self) -> dict:
        """Blocks or block products for this step, keyed by parameter name."""
        split = {"split": self.split} if self.split != 1 else {}  # modules from before split keep working
        if self.source == "blocks":
            return self.curvature.blocks(self.kind, self.average_input_jacobian, self.average_parameter_jacobian,
                                         **split)
        return self.curvature.block_products(self.kind, **split)

    def reused_source(self) -> dict:
        """``curvature_source()``, formed every ``curvature_every`` steps (with ``solver="direct"`` each block's
        eigendecomposition is kept in an ``EigenBlock``, so the steps in between cost products and rotations only)."""
        self.formed = self.cached is None or self.steps_taken % self.curvature_every == 0
        if not self.formed:
            self.steps_taken += 1
            return self.cached
        source = self.curvature_source()
        if self.mode == KRONECKER_BLOCKS:
            too_large = [name for name, block in source.items() if not solvable(block)]
            if too_large:
                raise MemoryError(f"the blocks of {', '.join(too_large)} are dense and over {DENSE_LIMIT} parameters")
        wrap = self.curvature_every > 1 or self.relative_damping  # split blocks (.parts) solve their own parts
        shared = {}  # one eigendecomposition per distinct matrix
        self.cached = {n: EigenBlock(b, shared) if wrap and not hasattr(b, "parts") else b for n, b in source.items()}
        self.steps_taken += 1
        return self.cached

    def preconditioners(self, blocks: dict | None, alpha: float) -> dict[str, Callable[[Tensor], Tensor]]:
        """``{name: r -> M⁻¹ r}`` from the HBP blocks (``blocks`` when they are this step's PSD source)."""
        if self.preconditioner is None:
            return {}
        if blocks is None or self.kind == "hessian":
            kind = "ggn" if self.kind == "hessian" else self.kind
            try:
                blocks = self.curvature.blocks(kind, self.average_input_jacobian, self.average_parameter_jacobian)
            except MemoryError:  # above the module's memory_limit: CG runs unpreconditioned
                return {}
        made = {name: block_preconditioner(block, alpha, self.preconditioner) for name, block in blocks.items()}
        return {name: M for name, M in made.items() if M is not None}

    def direction(self, name: str, operator, g: Tensor, group: dict, x0: Tensor | None,
                  M) -> tuple[Tensor, ParamStats]:
        """Damped Newton direction ``d`` for one parameter; ``operator`` is a Block or ``v -> B v``."""
        if self.solver == "direct":
            return solve_direct(operator, g, group["alpha"], self.relative_damping)
        product = as_product(operator, self.source)
        return solve_cg(product, g, group["alpha"], group["cg_tol"], group["cg_atol"], group["cg_maxiter"], x0, M)

    def step_lr(self, group: dict) -> float:
        """The group's ``lr``; unset (``None``): ``KRONECKER_LR`` in the Kronecker mode, else ``DEFAULT_LR``."""
        if group["lr"] is not None:
            return group["lr"]
        return KRONECKER_LR if self.mode == KRONECKER_BLOCKS else DEFAULT_LR

    def previous_direction(self, p: Tensor) -> Tensor | None:
        """``WARM_DECAY`` times the last step's direction for ``p`` (``warm_start``), else ``None``."""
        d = self.state[p].get("direction") if self.warm_start else None
        return None if d is None else WARM_DECAY * d

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Newton-CG step; returns the closure's loss (before the step) or ``None``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = self.last_stats = StepStats(loss=None if loss is None else float(loss))
        active = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not self.healthy(stats.loss, active, stats) or not active:
            return loss
        self.use(KRONECKER_BLOCKS if KRONECKER_BLOCKS in self.modes and (closure is not None or PRODUCTS not in self.modes)
                 else next(reversed(self.modes)))
        try:
            solve = self.full_steps if self.source == "full" else self.block_steps
            steps, curvature_along = solve(active, stats)  # curvature_along(steps): Σ sᵀ B s of the undamped model
        except MemoryError:  # blocks() refused (its memory_limit) or are too costly to solve: block products from now on
            if self.mode != KRONECKER_BLOCKS or PRODUCTS not in self.modes:
                raise
            del self.modes[KRONECKER_BLOCKS]
            self.use(PRODUCTS)
            steps, curvature_along = self.block_steps(active, stats)
        if not all(is_finite(s) for _, s in steps):
            stats.skipped, stats.scale = "non-finite step", 0.0
            self.warn("a step was not finite")
            return loss
        self.capped(steps, stats, warn=closure is None or self.max_backtracks is None)
        gs = sum(inner(p.grad, s).item() for p, s in steps)
        checked = closure is not None and (self.max_backtracks is not None or self.adaptive_damping)
        sGs = None
        if self.line_search or (self.line_search is None and closure is None):
            sGs = self.ggn_quadratic(steps)
            alpha = self.state[steps[0][0]].get("solve_alpha", active[0][0]["alpha"])
            scales = [self.state[p].get("damping_scale", 1.0) if self.relative_damping else 1.0 for p, _ in steps]
            denominator = (1.0 - alpha) * sGs + alpha * sum(c * inner(s, s).item() for c, (_, s) in zip(scales, steps))
            stats.scale = min(1.0, -gs / denominator) if denominator > 0.0 and gs < 0.0 else 1.0
        if checked and sGs is not None:  # the full GGN's model, measured anyway (Martens 2010)
            quadratic = sGs
        elif self.adaptive_damping or self.line_search is not False:  # the undamped model the solve trusted
            quadratic = curvature_along(steps)
        else:
            quadratic = 0.0
        model = lambda t: t * gs + 0.5 * t * t * quadratic  # noqa: E731
        for p, s in steps:  # only now: the curvature may read parameters lazily
            p.add_(s, alpha=stats.scale)
        if checked:
            self.check_loss(closure, steps, stats)
            stats.predicted = model(stats.scale) if stats.accepted else None
            stats.rho = reduction_ratio(stats.loss_after - stats.loss, stats.predicted) if stats.accepted else -math.inf
        elif sGs is not None:  # no loss to compare with: the blocks' curvature along s against the full GGN's
            stats.predicted = model(stats.scale)
            stats.rho = quadratic / sGs if sGs > 0.0 else 1.0
        if self.adaptive_damping and stats.rho is not None:
            for group in self.param_groups:
                group["alpha"] = update_damping(group["alpha"], stats.rho, self.min_alpha)
        return loss

    def capped(self, steps: list[tuple[Tensor, Tensor]], stats: StepStats, warn: bool) -> None:
        """Shorten each ``s`` in ``steps`` (in place) to ``‖s‖ <= max_step · max(‖θ‖, 1)``, before the line search;
        ``warn``: say so. With a loss check after the step (a closure, ``max_backtracks``) the cap is part of the
        step-length control (early Kronecker steps of zero-initialised biases meet it on the FCNN) and is only
        recorded in ``stats.capped``; a divergence still warns through the loss."""
        for i, (p, s) in enumerate(steps):
            if self.max_step is None:
                break
            bound = self.max_step * max(p.detach().norm().item(), 1.0)
            norm = s.norm().item()
            if norm > bound:
                stats.capped.append(self.names[p])
                steps[i] = (p, s * (bound / norm))
        if stats.capped and warn:
            self.warn(f"the steps of {', '.join(stats.capped)} were over {self.max_step:g} times their parameters' "
                      "norms and were shortened", "or raise max_step if such steps are expected",
                      headline="NewtonCG shortened oversized steps (divergence, or a large lr on purpose)")

    def check_loss(self, closure: Callable[[], Tensor], steps: list[tuple[Tensor, Tensor]], stats: StepStats) -> None:
        """Evaluate ``L(θ + t s)``; shrink ``t`` while the loss rose (``max_backtracks``), else undo the step."""
        while True:
            with torch.enable_grad():
                stats.loss_after = float(closure())
            if self.max_backtracks is None or stats.loss_after <= stats.loss:
                return
            shrunk = BACKTRACK * stats.scale if stats.backtracks < self.max_backtracks else 0.0
            for p, s in steps:
                p.add_(s, alpha=shrunk - stats.scale)
            stats.scale = shrunk
            if shrunk == 0.0:
                stats.accepted, stats.loss_after = False, stats.loss
                return
            stats.backtracks += 1

    def healthy(self, loss: float | None, active: list, stats: StepStats) -> bool:
        """Whether a step may be taken: a finite loss and gradients; warns on divergence (see module docstring)."""
        if loss is not None and not math.isfinite(loss):
            stats.skipped = "non-finite loss"
        elif not all(is_finite(p.grad) for _, p in active):
            stats.skipped = "non-finite gradient"
        if stats.skipped is not None:
            stats.scale, stats.accepted = 0.0, False
            self.warn(f"the {stats.skipped.split(' ', 1)[1]} is not finite, so no step was taken")
            return False
        if loss is not None:
            if self.first_loss is None:
                self.first_loss = loss
            elif loss > DIVERGENCE * abs(self.first_loss):
                self.warn(f"the loss rose from {self.first_loss:.3g} to {loss:.3g}")
        return True

    def warn(self, what: str, *more_advice: str, headline: str = "NewtonCG diverges") -> None:
        """One ``RuntimeWarning`` per optimizer and headline that says ``what`` happened and which settings to change."""
        if headline in self.warned:
            return
        self.warned.add(headline)
        advice = ["raise alpha", "lower lr"]
        if not self.adaptive_damping:
            advice.append("set adaptive_damping=True")
        if not self.line_search and self.source != "full":
            advice.append("set line_search=True")
        if self.max_backtracks is None:
            advice.append("set max_backtracks=2 and pass a closure to step()")
        if self.source == "blocks" and self.average_parameter_jacobian:
            advice.append("set average_parameter_jacobian=False")
        if self.source != "full":
            advice.append('try source="full", curvature="ggn"')
        warnings.warn(f"{headline}: {what}; {', '.join(advice + list(more_advice))}", RuntimeWarning,
                      stacklevel=3)

    def ggn_quadratic(self, steps: list[tuple[Tensor, Tensor]]) -> float:
        """``sᵀ G s`` with the full GGN over the stepped parameters (one ``ggn_vector_product``)."""
        G = full_operator(self.curvature, "ggn", [self.names[p] for p, _ in steps])
        s = G.flatten([s for _, s in steps])
        return inner(s, G.matvec(s)).item()

    def block_steps(self, active: list, stats: StepStats) -> tuple[list[tuple[Tensor, Tensor]], Callable]:
        """``[(p, lr · d)]`` from one solve per block, and ``Σ_θ sᵀ B s`` of the undamped blocks."""
        operators = self.reused_source()
        preconditioners = self.preconditioners(operators if self.source == "blocks" else None,
                                               active[0][0]["alpha"] if active else 0.0)
        steps = []
        for group, p in active:
            name = self.names[p]
            g = p.grad.detach()
            if self.formed or "solve_alpha" not in self.state[p]:  # α reaches reused blocks when they are re-formed
                self.state[p]["solve_alpha"] = group["alpha"]
            solving = {**group, "alpha": self.state[p]["solve_alpha"]}
            d = self.split_direction(name, operators[name], g, solving, stats, self.previous_direction(p),
                                     preconditioners.get(name))
            self.state[p]["direction"] = d
            if self.relative_damping:
                self.state[p]["damping_scale"] = damping_scale(operators[name])
            s = self.step_lr(group) * d
            steps.append((p, s))
        def curvature_along(steps: list[tuple[Tensor, Tensor]]) -> float:
            return sum(quadratic(operators[self.names[p]], s, self.source) for p, s in steps)

        return steps, curvature_along

    def split_direction(self, name: str, operator, g: Tensor, group: dict, stats: StepStats,
                        x0: Tensor | None, M) -> Tensor:
        """One solve per row chunk when the operator is split (has ``.parts``), else one for the parameter."""
        parts = getattr(operator, "parts", None)
        if parts is None:
            d, stats.params[name] = self.direction(name, operator, g, group, x0, M)
            return d
        pieces = []
        for start, stop, part in parts:
            start_at = None if x0 is None else x0[start:stop]
            d, stats.params[f"{name}[{start}:{stop}]"] = self.direction(name, part, g[start:stop], group, start_at,
                                                                         None)
            pieces.append(d)
        return torch.cat(pieces, 0)

    def full_steps(self, active: list, stats: StepStats) -> tuple[list[tuple[Tensor, Tensor]], Callable]:
        """``[(p, lr · d)]`` from one CG solve ``[(1 - α) A + α I] d = -g`` over all ``active`` parameters.

        ``A`` is the full GGN or Hessian on the stacked parameters, ``(n, n)``; also returns ``sᵀ A s``.
        """
        if not active:
            return [], lambda steps: 0.0
        params = [p for _, p in active]
        A = full_operator(self.curvature, self.kind, [self.names[p] for p in params])
        g = A.flatten([p.grad.detach() for p in params])
        shared = active[0][0]  # α and the CG settings are the same in every group (check_shared)
        previous = [self.previous_direction(p) for p in params]
        x0 = None if any(d is None for d in previous) else A.flatten(previous)
        blockwise = self.preconditioners(None, shared["alpha"])
        M = None
        if blockwise:
            names = [self.names[p] for p in params]
            M = lambda r: A.flatten([blockwise[n](t) if n in blockwise else t  # noqa: E731
                                     for n, t in zip(names, A.unflatten(r))])
        d, stats.params[FULL] = solve_cg(A.matvec, g, shared["alpha"], shared["cg_tol"], shared["cg_atol"],
                                         shared["cg_maxiter"], x0, M)
        for p, t in zip(params, A.unflatten(d)):
            self.state[p]["direction"] = t
        steps = [self.step_lr(group) * t for (group, _), t in zip(active, A.unflatten(d))]
        def curvature_along(steps: list[tuple[Tensor, Tensor]]) -> float:
            s = A.flatten([t for _, t in steps])
            return inner(s, A.matvec(s)).item()

        return list(zip(params, steps)), curvature_along


def solvable(block) -> bool:
    """Whether the Kronecker mode solves ``block`` cheaply: Kronecker factors, or a dense matrix of at most
    ``DENSE_LIMIT`` rows (an ``(n, n)`` inverse costs ``n³``: a convolution's dense block of 12800 parameters took
    minutes per step)."""
    return block.kronecker_factors is not None or (hasattr(block, "matrix") and block.matrix.shape[0] <= DENSE_LIMIT)


def check_group(group: dict) -> None:
    """Validate one parameter group's hyper-parameters."""
    alpha = group["alpha"]
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha} is out of range, need 0 <= alpha < 1")
    if group["lr"] is not None and not group["lr"] > 0.0:
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
