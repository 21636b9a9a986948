"""laplace-torch ``CurvatureInterface`` backends computed by a compiled hbpc ``Curvature``.

laplace-torch fits over a loader itself and calls, per batch ``(X, y)`` of ``M`` samples out of ``N``:

| method | returns | hbpc |
|---|---|---|
| ``full(X, y)`` | ``(c·L, c·G)``, ``G`` the ``(P, P)`` GGN (Hessian) of ``L`` | ``full_operator(curvature, mode).to_dense()`` |
| ``kron(X, y, N)`` | ``(c·L, c·Kron)``, per layer ``[G, (M/N)·A]`` and ``[G]`` for a bias | ``kronecker_factors("kflr")`` |
| ``diag(X, y)`` | ``(c·L, c·diag G)`` | exact, from products with identity columns |

with laplace-torch's conventions: ``L`` is the loss with ``reduction="sum"`` (``CrossEntropyLoss`` for
classification, ``MSELoss`` for regression), ``c = self.factor`` (1, and ½ for regression: ``MSELoss``
is twice the Gaussian negative log likelihood), sums over the batch that laplace-torch adds up over
batches (``A = (1/M) Σ x xᵀ`` is rescaled by ``M/N``, so the summed ``A`` is the mean over all data).
``stochastic=True`` uses the Monte-Carlo Fisher (``fisher-mc`` / ``kfac``, classification only).

Last-layer Laplace (laplace-torch's default ``subset_of_weights="last_layer"``) compiles the last layer
alone and feeds it the features ``φ(X)``. The model is compiled by ``hbpc.compile_model`` on the first call (or pass ``compiled=``, the module
from ``hbpc compile``); a model hbpc can't compile raises ``HbpcError`` saying why. ``p.grad`` is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from laplace.curvature import CurvatureInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor, nn

from hbpc.errors import HbpcError
from hbpc.linalg import diagonal, full_operator
from hbpc.linalg.dataset import kept_gradients

DIAGONAL_CHUNK = 512


class HBPCInterface(CurvatureInterface):
    """Shared part of the hbpc backends: compiling, caching one batch, the loss, ``full`` and ``diag``."""

    mode = "ggn"

    def __init__(self, model: nn.Module, likelihood, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", stochastic: bool = False, num_samples: int = 1, compiled=None):
        if subnetwork_indices is not None:
            raise ValueError("the hbpc backends compute the curvature of all (or the last layer's) parameters; "
                             "for subnetwork Laplace use laplace-torch's CurvlinopsGGN or AsdlGGN")
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.stochastic, self.num_samples = stochastic, num_samples  # after GGNInterface, which resets them
        if stochastic and self.likelihood == "regression":
            raise ValueError("stochastic=True (Monte-Carlo Fisher) is for classification only in hbpc")
        self.compiled, self._curvature = compiled, None
        self.names = [name for name, p in self._model.named_parameters() if p.requires_grad]

    def inputs(self, X: Tensor) -> Tensor:
        """What the compiled model sees: ``X``, or the features ``φ(X)`` for last-layer Laplace."""
        if not isinstance(X, Tensor):
            raise TypeError(f"the hbpc backends need tensor inputs, got {type(X).__name__}")
        if not self.last_layer:
            return X
        with torch.no_grad():
            return self.model.forward_with_features(X)[1]

    def curvature(self, X: Tensor):
        """The ``Curvature`` of ``self._model`` (the last layer for last-layer Laplace) at inputs ``X``;
        compiles it with ``self.lossfunc`` on first use."""
        if self._curvature is None:
            if self.compiled is None:
                from hbpc import compile_model

                try:
                    self.compiled = compile_model(self._model, X[:1], self.lossfunc)
                except HbpcError as error:
                    raise HbpcError(f"hbpc could not compile the model for the Laplace backend:\n{error}",
                                    fix="use a model of supported ops (`hbpc rules`), or laplace-torch's "
                                        "CurvlinopsGGN backend") from error
            self._curvature = self.compiled.Curvature(self._model)
        return self._curvature

    def batch(self, X: Tensor, y: Tensor):
        """``(c·L, curvature)`` after caching the batch, with every ``p.grad`` kept as it was."""
        X = self.inputs(X)
        curvature = self.curvature(X)
        with kept_gradients(list(self._model.parameters())):
            loss = curvature.forward_backward(X, y)
        return self.factor * loss.detach(), curvature

    def operator(self, curvature):
        """The full ``(P, P)`` curvature operator over the trainable parameters."""
        mode = "fisher-mc" if self.stochastic else self.mode
        return full_operator(curvature, mode, self.names, samples=self.num_samples)

    def full(self, X: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        loss, curvature = self.batch(X, y)
        return loss, self.factor * self.operator(curvature).to_dense()

    def diag(self, X: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        loss, curvature = self.batch(X, y)
        return loss, self.factor * diagonal(self.operator(curvature), chunk=DIAGONAL_CHUNK)


class HBPCGGN(HBPCInterface, GGNInterface):
    """The GGN (``stochastic=True``: the Monte-Carlo Fisher) by hbpc; ``kron`` is KFLR (``stochastic``: KFAC)."""

    def kron(self, X: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        loss, curvature = self.batch(X, y)
        kind = "kfac" if self.stochastic else "kflr"
        factors = curvature.kronecker_factors(kind, samples=self.num_samples)
        missing = [name for name in self.names if name not in factors]
        if missing:
            raise ValueError(f"no Kronecker factors for {missing}: hbpc factors Linear and one-group Conv layers "
                             "only; use hessian_structure='full' or 'diag' for this model")
        M = X.shape[0]
        kfacs = []
        for name in self.names:
            block = factors[name]
            if block.kronecker_factors is None:
                kfacs.append([block.to_dense()])
            else:
                G, A = block.kronecker_factors
                kfacs.append([G, A * (M / N)])
        return loss, Kron(kfacs) * self.factor


class HBPCHessian(HBPCInterface):
    """The Hessian by hbpc (``full`` and ``diag``; there is no Kronecker-factored Hessian)."""

    mode = "hessian"

    def __init__(self, model: nn.Module, likelihood, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", compiled=None):
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, compiled=compiled)

    def kron(self, X: Tensor, y: Tensor, N: int, **kwargs: Any):
        raise ValueError("HBPCHessian has no Kronecker factors; use HBPCGGN for hessian_structure='kron'")
