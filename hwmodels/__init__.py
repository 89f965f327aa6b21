"""Hardware and model catalogs and the cost model built on them (no torch, no simpy)."""
from .batch import BatchShape
from .costmodel import CapacityError, CostModel, MemoryBudget
from .hardware import HardwareSpec, hardware_names, load_hardware, matching_entry
from .models import ModelSpec, load_model, model_names
from .spec import CatalogError, GiB

__all__ = ["BatchShape", "CapacityError", "CatalogError", "CostModel", "GiB", "HardwareSpec", "MemoryBudget",
           "ModelSpec", "hardware_names", "load_hardware", "matching_entry", "load_model", "model_names"]
