"""Every decision of Pie (batching, block tables, layer swapping, adaptive expansion, baselines).

Imports neither torch nor simpy: the simulator and the executor run this same code.
"""
from .config import ConfigError, EngineConfig
from .expansion import ExpansionController
from .plan import Copy, IterationStats, LayerStep, Plan, SeqWork
from .policies import POLICIES, Policy
from .request import Request, State

__all__ = ["POLICIES", "ConfigError", "Copy", "EngineConfig", "ExpansionController", "IterationStats",
           "LayerStep", "Plan", "Policy", "Request", "SeqWork", "State"]
