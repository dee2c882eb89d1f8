"""Task-weighting transforms: per-task losses (and Gramian/Jacobian) -> weights.

Every transform is a :class:`WeightingTransform` (``init``, ``update``,
``needs``) whose ``update(losses, state, **inputs)`` reads the inputs it needs
and ignores the rest. They compose with :func:`chain` and :func:`named_chain`;
:func:`inject_hyperparams` schedules their numeric arguments; a user's own
transform built with :func:`stateless` or by hand chains with the built-ins.
:func:`methods` lists the built-in methods by name.
"""

from jmtl.weighting._allocation import PCDState
from jmtl.weighting._allocation import fairgrad
from jmtl.weighting._allocation import pcd
from jmtl.weighting._base import HEADS
from jmtl.weighting._base import INPUTS
from jmtl.weighting._base import NEEDS
from jmtl.weighting._base import REQUIRES
from jmtl.weighting._base import ChainState
from jmtl.weighting._base import Direction
from jmtl.weighting._base import EmptyState
from jmtl.weighting._base import InjectHyperparamsState
from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import aggregate
from jmtl.weighting._base import as_aggregator
from jmtl.weighting._base import chain
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import combine_jacobian
from jmtl.weighting._base import gramian_of
from jmtl.weighting._base import init_state
from jmtl.weighting._base import inject_hyperparams
from jmtl.weighting._base import is_task_vector
from jmtl.weighting._base import keep_absent
from jmtl.weighting._base import last_layer
from jmtl.weighting._base import methods
from jmtl.weighting._base import named_chain
from jmtl.weighting._base import needs_of
from jmtl.weighting._base import only_present
from jmtl.weighting._base import power_of_two
from jmtl.weighting._base import power_of_two_scale
from jmtl.weighting._base import present_of
from jmtl.weighting._base import scaled_gramian
from jmtl.weighting._base import stateless
from jmtl.weighting._base import times_power_of_two
from jmtl.weighting._elementwise import graddrop
from jmtl.weighting._excess import ExcessMTLState
from jmtl.weighting._excess import excess_mtl
from jmtl.weighting._gradnorm import GradNormState
from jmtl.weighting._gradnorm import gradnorm
from jmtl.weighting._gramian import NashMTLState
from jmtl.weighting._gramian import cagrad
from jmtl.weighting._gramian import dualproj
from jmtl.weighting._gramian import mgda
from jmtl.weighting._gramian import nash_mtl
from jmtl.weighting._gramian import upgrad
from jmtl.weighting._learned import AutoLambdaState
from jmtl.weighting._learned import FAMOState
from jmtl.weighting._learned import IMTLLState
from jmtl.weighting._learned import UncertaintyState
from jmtl.weighting._learned import auto_lambda
from jmtl.weighting._learned import famo
from jmtl.weighting._learned import imtl_l
from jmtl.weighting._learned import uncertainty
from jmtl.weighting._loss_level import DWAState
from jmtl.weighting._loss_level import STCHState
from jmtl.weighting._loss_level import dwa
from jmtl.weighting._loss_level import gls
from jmtl.weighting._loss_level import rgw
from jmtl.weighting._loss_level import rlw
from jmtl.weighting._loss_level import stch
from jmtl.weighting._projection import GradVacState
from jmtl.weighting._projection import aligned_mtl
from jmtl.weighting._projection import config
from jmtl.weighting._projection import gradvac
from jmtl.weighting._projection import imtl_g
from jmtl.weighting._projection import pcgrad
from jmtl.weighting._robust import krum
from jmtl.weighting._robust import trimmed_mean
from jmtl.weighting._sampled import SimplexState
from jmtl.weighting._sampled import modo
from jmtl.weighting._sampled import sdmgrad
from jmtl.weighting._static import equal
from jmtl.weighting._static import static
from jmtl.weighting._tracked import DBMTLState
from jmtl.weighting._tracked import MoCoState
from jmtl.weighting._tracked import db_mtl
from jmtl.weighting._tracked import moco

__all__ = [
  "HEADS",
  "INPUTS",
  "NEEDS",
  "REQUIRES",
  "AutoLambdaState",
  "ChainState",
  "DBMTLState",
  "DWAState",
  "Direction",
  "EmptyState",
  "ExcessMTLState",
  "FAMOState",
  "GradNormState",
  "GradVacState",
  "IMTLLState",
  "InjectHyperparamsState",
  "MoCoState",
  "NashMTLState",
  "PCDState",
  "STCHState",
  "SimplexState",
  "UncertaintyState",
  "WeightingTransform",
  "aggregate",
  "aligned_mtl",
  "as_aggregator",
  "auto_lambda",
  "cagrad",
  "chain",
  "checked_gramian",
  "combine_jacobian",
  "config",
  "db_mtl",
  "dualproj",
  "dwa",
  "equal",
  "excess_mtl",
  "fairgrad",
  "famo",
  "gls",
  "graddrop",
  "gradnorm",
  "gradvac",
  "gramian_of",
  "imtl_g",
  "imtl_l",
  "init_state",
  "inject_hyperparams",
  "is_task_vector",
  "keep_absent",
  "krum",
  "last_layer",
  "methods",
  "mgda",
  "moco",
  "modo",
  "named_chain",
  "nash_mtl",
  "needs_of",
  "only_present",
  "pcd",
  "pcgrad",
  "power_of_two",
  "power_of_two_scale",
  "present_of",
  "rgw",
  "rlw",
  "scaled_gramian",
  "sdmgrad",
  "stateless",
  "static",
  "stch",
  "times_power_of_two",
  "trimmed_mean",
  "uncertainty",
  "upgrad",
]
