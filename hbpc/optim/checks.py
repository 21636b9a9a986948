"""Argument checks the optimizers share."""

from __future__ import annotations

import torch


def curvature_model(curvature) -> torch.nn.Module:
    """The model a compiled ``Curvature`` is bound to; ``TypeError`` for anything else (e.g. the model itself)."""
    model = getattr(curvature, "model", None) if hasattr(curvature, "forward_backward") else None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"curvature must be a compiled Curvature bound to the model (curv_model.Curvature(model)), "
                        f"got {type(curvature).__name__}")
    return model
