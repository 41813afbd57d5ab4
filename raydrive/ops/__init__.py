"""Hot ops: one PyTorch reference each, with dispatch to fused kernels where they exist."""

from raydrive.ops.deformable_aggregation import deformable_aggregation

__all__ = ["deformable_aggregation"]
