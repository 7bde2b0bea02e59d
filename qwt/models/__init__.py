"""Block adapters (one per family, imported lazily when a model of its library is seen) and model
builders (``zoo.py``)."""
from .base import AdaptedModel, ModelAdapter, PrecondSite, Role, State, Unit, adapter_for, move, register_adapter
