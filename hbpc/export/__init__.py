"""Stage 1: model -> torch.fx graph -> networkx IR."""
from .load import ModelSpec, load_model_file, load_rules_file
from .lower import export, graph_hash

__all__ = ["ModelSpec", "load_model_file", "load_rules_file", "export", "graph_hash"]
