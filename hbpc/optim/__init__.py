"""Runtime optimizers that consume a generated ``Curvature`` (no compiler imports)."""

from hbpc.optim.cg import CGInfo, cg
from hbpc.optim.kfac import KFAC
from hbpc.optim.newton_cg import NewtonCG
from hbpc.optim.presets import KRONECKER, PAPER
from hbpc.optim.stats import ParamStats, StepStats
from hbpc.optim.subsample import SubsampledCurvature

__all__ = ["CGInfo", "KFAC", "KRONECKER", "NewtonCG", "PAPER", "ParamStats", "StepStats", "SubsampledCurvature", "cg"]
