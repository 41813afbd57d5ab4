"""SparseDrive's model config: Sparse4D's (backbone, neck, depth branch, detection head) with
SparseDrive's detection deltas as defaults, plus the map head and the motion planner.

The model section stays flat (dotted overrides such as `model.map_num_anchor=50` work as for every
model); `map_config()` and `motion_config()` build the heads' own dataclasses from it. Defaults are
upstream's `projects/configs/sparsedrive_small_stage2.py`; `with_motion_plan` is what separates the
stages (stage 1: detection and map; stage 2: + motion and planning).
"""

from __future__ import annotations

from dataclasses import dataclass

from raydrive.models.sparse4d.model import Sparse4DConfig


@dataclass
class SparseDriveConfig(Sparse4DConfig):
    # detection deltas against Sparse4D v3 (spec §2.3)
    num_dn_groups: int = 0
    fix_yaw_swap: bool = True
    encode_last_anchor: bool = True
    track_in_training: bool = True  # upstream with_instance_id: the motion planner's queue follows ids
    # tasks (upstream task_config)
    with_map: bool = True
    with_motion_plan: bool = True
    # map head (spec §2.4)
    map_num_anchor: int = 100
    map_num_temp_instances: int = 33  # 0 in stage 1
    map_num_learnable_pts: int = 3
    map_decode_top_k: int = 50
    # motion planner (spec §2.5)
    motion_queue_length: int = 4
    motion_num_det: int = 50
    motion_num_map: int = 10
    motion_num_layers: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.with_motion_plan and not self.with_map:
            raise ValueError("with_motion_plan needs with_map: the planner attends to the map instances")
        if self.map_num_temp_instances >= self.map_num_anchor:
            raise ValueError("map_num_temp_instances must be smaller than map_num_anchor")
