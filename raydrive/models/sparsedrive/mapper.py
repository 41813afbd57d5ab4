"""SparseDrive's frame mapper: Sparse4D's frame plus the map, future and ego-status targets.

Upstream's train pipeline (`projects/configs/sparsedrive_small_stage{1,2}.py`) is Sparse4D's with
`rot3d_range = [0, 0]` (no BEV rotation, so the map and future targets need none either), boxes kept
where they have lidar points (`use_valid_flag=False`), `VectorizeMap` (20 points, permuted, metres, not
normalised) and the futures, command and CAN ego status of `raydrive prepare`'s SparseDrive columns.
Agent futures are filtered with the boxes, so row i of `gt_agent_fut_trajs` belongs to box i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydrive.config import TrainConfig
from raydrive.data.frames import stack_ragged
from raydrive.data.infos import DataError
from raydrive.data.sparsedrive_fields import AGENT_FUT_STEPS, map_annos_from_columns
from raydrive.models.sparse4d.mapper import COLUMNS, Sparse4DMapper, Sparse4DMapperConfig
from raydrive.models.sparsedrive.map_target import NUM_SAMPLE, map_targets, num_permutations

SPARSEDRIVE_COLUMNS = (
    "has_map_annos", "map_points", "map_line_label", "map_line_num_points", "has_futures",
    "gt_agent_fut_trajs", "gt_agent_fut_masks", "gt_ego_fut_trajs", "gt_ego_fut_masks", "gt_ego_fut_cmd",
    "ego_status",
)  # fmt: skip


@dataclass
class SparseDriveMapperConfig(Sparse4DMapperConfig):
    bev_rot: tuple[float, float] = (0.0, 0.0)  # upstream rot3d_range [0, 0]; the map/future targets assume it
    valid_points: str = "lidar"


class SparseDriveMapper(Sparse4DMapper):
    """Plain data and one method (pickled into every Ray Data task)."""

    columns = COLUMNS + SPARSEDRIVE_COLUMNS
    ragged = {
        **Sparse4DMapper.ragged,
        "gt_agent_fut_trajs": (AGENT_FUT_STEPS, 2),
        "gt_agent_fut_masks": (AGENT_FUT_STEPS,),
        "map_labels": (),
        "map_lines": (num_permutations(NUM_SAMPLE), NUM_SAMPLE, 2),  # every permutation of each GT line
    }

    def __init__(self, cfg: TrainConfig, train: bool):
        if tuple(cfg.mapper.bev_rot) != (0.0, 0.0):
            raise ValueError(
                f"mapper.bev_rot={tuple(cfg.mapper.bev_rot)}: SparseDrive's map and future targets are not "
                "rotated; keep (0, 0) as upstream"
            )
        super().__init__(cfg, train)

    def frame(self, row: dict) -> dict[str, np.ndarray]:
        out = super().frame(row)
        if not bool(row["has_map_annos"]) or not bool(row["has_futures"]):
            missing = "map annotations" if not bool(row["has_map_annos"]) else "future trajectories"
            raise DataError(
                f"frame {row['token']} has no {missing}: prepare the set with the nuScenes map expansion "
                "and CAN bus installed (`raydrive prepare`; see `raydrive doctor`)"
            )
        keep = self._keep(row)  # the boxes super().frame() kept
        trajs = stack_ragged(row["gt_agent_fut_trajs"], (AGENT_FUT_STEPS, 2), np.float32)[keep]
        masks = stack_ragged(row["gt_agent_fut_masks"], (AGENT_FUT_STEPS,), np.float32)[keep]
        cols = {
            "map_points": stack_ragged(row["map_points"], (2,), np.float64),
            "map_line_label": stack_ragged(row["map_line_label"], (), np.int64),
            "map_line_num_points": stack_ragged(row["map_line_num_points"], (), np.int64),
        }
        labels, lines = map_targets(map_annos_from_columns(cols))
        labels, lines = np.asarray(labels, np.int64), np.asarray(lines, np.float32)
        out.update(
            gt_agent_fut_trajs=trajs,
            gt_agent_fut_masks=masks,
            map_labels=labels,
            map_lines=lines,
            gt_ego_fut_trajs=_dense(row["gt_ego_fut_trajs"]).reshape(-1, 2),
            gt_ego_fut_masks=_dense(row["gt_ego_fut_masks"]).reshape(-1),
            gt_ego_fut_cmd=_dense(row["gt_ego_fut_cmd"]).reshape(3),
            ego_status=_dense(row["ego_status"]).reshape(-1),
        )
        return out


def _dense(value) -> np.ndarray:
    """A fixed-shape column's value as float32 (Ray Data may hand nested rows as object arrays)."""
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = np.stack([_dense(v) for v in arr]) if arr.ndim else np.asarray(arr.item())
    return arr.astype(np.float32)
