"""Runtime optimizers that consume a generated ``Curvature`` (no compiler imports)."""

from hbpc.optim.cg import CGInfo, cg
from hbpc.optim.kfac import KFAC
from hbpc.optim.newton_cg import KRONECKER, PAPER, NewtonCG, ParamStats, StepStats
from hbpc.optim.subsample import SubsampledCurvature

__all__ = ["CGInfo", "KFAC", "KRONECKER", "NewtonCG", "PAPER", "ParamStats", "StepStats", "SubsampledCurvature", "cg"]
