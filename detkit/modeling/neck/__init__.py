"""Necks: modules between the backbone and the heads (the FPN)."""
from detkit.modeling.neck.fpn import FPN, level_name

__all__ = ["FPN", "level_name"]
