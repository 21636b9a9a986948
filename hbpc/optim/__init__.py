"""Runtime optimizers that consume a generated ``Curvature`` (no compiler imports)."""

from hbpc.optim.cg import CGInfo, cg
from hbpc.optim.kfac import KFAC
from hbpc.optim.newton_cg import NewtonCG, ParamStats, StepStats

__all__ = ["CGInfo", "KFAC", "NewtonCG", "ParamStats", "StepStats", "cg"]
