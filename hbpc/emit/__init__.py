"""Stage 4: print the curvature program as a readable, torch-only Python module."""
from .module import emit

__all__ = ["emit"]
