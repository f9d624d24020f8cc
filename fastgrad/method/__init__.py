"""Gradient estimation methods (Storchastic's ``storch.method``): call one on a torch distribution."""
from ._base import Draw, Facts, Method
from .arm import ARM, ARMS, CARMS, DisARM
from .double_cv import RODEO, DoubleCV, SteinControl
from .expect import Expect
from .gumbel_softmax import GumbelSoftmax
from .relax import LAX, REBAR, RELAX
from .relaxed import (SIMPLE, DecoupledStraightThrough, GappedStraightThrough, GumbelEntmax, GumbelRao, GumbelSparseMax,
                      IndeCateR, ReinMax, ReinMaxCV, ReinMaxRao)
from .infer import Infer
from .reparameterization import Reparameterization
from .score_function import ScoreFunction
from .vimco import VIMCO
from .without_replacement import (GumbelSoftmaxWOR, RaoBlackwellSF, ScoreFunctionWOR, UnorderedSetEstimator,
                                  UnorderedSetGumbelSoftmax)

__all__ = ["Method", "Draw", "Facts", "ScoreFunction", "GumbelSoftmax", "Expect", "Reparameterization", "Infer", "ARM",
           "DisARM", "ARMS", "CARMS", "RELAX", "REBAR", "LAX", "VIMCO", "ScoreFunctionWOR", "UnorderedSetEstimator",
           "RaoBlackwellSF", "UnorderedSetGumbelSoftmax", "GumbelSoftmaxWOR", "GumbelEntmax", "GumbelSparseMax",
           "ReinMax", "ReinMaxRao", "ReinMaxCV", "GumbelRao", "IndeCateR", "SIMPLE", "GappedStraightThrough",
           "DecoupledStraightThrough", "DoubleCV", "RODEO", "SteinControl"]
