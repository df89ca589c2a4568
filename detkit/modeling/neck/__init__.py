"""Necks: modules between the backbone and the heads (the FPN)."""
from detkit.modeling.neck.fpn import FPN, FPNBuilder, level_name

__all__ = ["FPN", "FPNBuilder", "level_name"]
