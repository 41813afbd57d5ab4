"""SparseDrive's instance queue: the last few frames of every tracked detection and of the ego car.

Behaviour from swc-17/SparseDrive `projects/mmdet3d_plugin/models/motion/instance_queue.py`:
- each frame the detection head's instance features and last-layer boxes are appended (detached) and
  the queue keeps `queue_length` frames, the current one included;
- earlier entries are re-indexed to follow tracking ids: current query q takes the history of the
  previous query with the same id, counted only where that query's confidence was above
  `tracking_threshold`; an instance without a match starts a new history (period 1);
- queued boxes are moved into the current lidar frame every frame (no velocity step, as upstream);
- the ego instance: its feature comes from the front camera's coarsest map, its anchor is a fixed box
  at the lidar (0, 0.5, -1.06; 4.08 x 1.73 x 1.56 m, heading +y) whose VY is the speed the planner
  predicted last frame; after the motion layers the refined ego feature replaces the queued one;
- `period` counts how many queued frames belong to an instance; older entries are masked.

What raydrive does differently:
- sequence starts come per batch slot through `reset(slots)` as well as from a timestamp jump above
  `max_time_interval` (upstream only sees the detection bank's time mask); such slots drop their
  agent histories even if the detection head happened to reuse ids;
- ids of -1 (no id) never match;
- the re-indexing gathers the one matching previous query (tracking ids are unique within a frame,
  so upstream's sum over matches is that query) without upstream's (bs, N, N, C) temporary;
- the ego feature is average-pooled to 1 x 1 adaptively: equal to upstream's AvgPool(4, 11) on the
  4 x 11 map a 256 x 704 input gives, and valid for other input sizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raydrive.models.sparse4d.blocks import VY, KeyPointsGenerator

EGO_SIZE = (4.08, 1.73, 1.56)  # ego length, width, height in metres (upstream's ego anchor)
EGO_Z = -1.84 + EGO_SIZE[2] / 2  # box centre height: the ground is 1.84 m below the lidar
EGO_STATUS_SPEED = 6  # index of the forward speed in the 10-d ego status (accel 3, rate 3, vel 3, steer)


class InstanceQueue(nn.Module):
    """Per-slot temporal memory for the motion planner. See the module docstring for the rules."""

    # state() keys -> attribute names (lists are stacked along dim 1)
    _TENSORS = {
        "period": "period",
        "ego_period": "ego_period",
        "instance_id": "prev_instance_id",
        "confidence": "prev_confidence",
        "ego_status": "prev_ego_status",
        "timestamp": "prev_timestamp",
        "T_global": "prev_T_global",
        "seq_reset": "pending_reset",
    }
    _LISTS = {
        "feature": "feature_queue",
        "anchor": "anchor_queue",
        "ego_feature": "ego_feature_queue",
        "ego_anchor": "ego_anchor_queue",
    }

    def __init__(
        self,
        embed_dims: int = 256,
        queue_length: int = 4,
        tracking_threshold: float = 0.2,
        max_time_interval: float = 2.0,
        front_cam: int = 0,
    ):
        super().__init__()
        self.queue_length, self.tracking_threshold = queue_length, tracking_threshold
        self.max_time_interval, self.front_cam = max_time_interval, front_cam
        self.ego_feature_encoder = nn.Sequential(
            nn.Conv2d(embed_dims, embed_dims, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(embed_dims),
            nn.Conv2d(embed_dims, embed_dims, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(embed_dims),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        size = [math.log(s) for s in EGO_SIZE]
        ego_anchor = torch.tensor([[0.0, 0.5, EGO_Z, *size, 1.0, 0.0, 0.0, 0.0, 0.0]])
        self.ego_anchor = nn.Parameter(ego_anchor, requires_grad=False)
        self.pending_reset: torch.Tensor | None = None
        self.reset()

    # ------------------------------------------------------------------ temporal state

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """None: forget everything. A bool (bs,) tensor: those slots start a new sequence at the next
        `get()` (their agent and ego histories are dropped there)."""
        if slots is None:
            self.feature_queue: list[torch.Tensor] = []
            self.anchor_queue: list[torch.Tensor] = []
            self.ego_feature_queue: list[torch.Tensor] = []
            self.ego_anchor_queue: list[torch.Tensor] = []
            self.period = self.ego_period = None
            self.prev_instance_id = self.prev_confidence = self.prev_ego_status = None
            self.prev_timestamp = self.prev_T_global = None
            self.pending_reset = None
            return
        slots = slots.to(self.ego_anchor.device, torch.bool, copy=True).reshape(-1)
        if self.pending_reset is not None and self.pending_reset.shape == slots.shape:
            slots = slots | self.pending_reset
        self.pending_reset = slots

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor carried to the next frame, as references (later frames assign new tensors)."""
        out = {key: getattr(self, attr) for key, attr in self._TENSORS.items() if getattr(self, attr) is not None}
        for key, attr in self._LISTS.items():
            if getattr(self, attr):
                out[key] = torch.stack(getattr(self, attr), dim=1)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state()`'s output; `{}` is a full reset."""
        self.reset()
        device = self.ego_anchor.device
        for key, attr in self._TENSORS.items():
            if key in state:
                setattr(self, attr, state[key].to(device))
        for key, attr in self._LISTS.items():
            if key in state:
                setattr(self, attr, list(state[key].to(device).unbind(1)))

    # ------------------------------------------------------------------ per frame

    def get(
        self, det_out: dict, feature_maps: list[torch.Tensor], metas: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Push this frame and return the ego instance and the queues.

        Returns ego_feature (bs, 1, C), ego_anchor (bs, 1, 11), temp_feature (bs, N + 1, L, C),
        temp_anchor (bs, N + 1, L, 11) and temp_mask (bs, N + 1, L), True = ignore that entry; the
        ego is the last instance, the current frame the last entry.
        """
        feature = det_out["instance_feature"]
        bs = feature.shape[0]
        continues = self._continuing_slots(bs, metas)
        if continues is None:
            self.reset()
            continues = torch.zeros(bs, dtype=torch.bool, device=feature.device)
        else:
            self._project_queues(metas)
        self.pending_reset = None
        self._push_agents(det_out, continues)
        ego_feature, ego_anchor = self._push_ego(feature_maps, continues)

        temp_feature = torch.cat(
            [torch.stack(self.feature_queue, dim=2), torch.stack(self.ego_feature_queue, dim=2)], dim=1
        )
        temp_anchor = torch.cat(
            [torch.stack(self.anchor_queue, dim=2), torch.stack(self.ego_anchor_queue, dim=2)], dim=1
        )
        period = torch.cat([self.period, self.ego_period], dim=1)
        age = torch.arange(len(self.anchor_queue), 0, -1, device=period.device)  # oldest first, current = 1
        temp_mask = age[None, None] > period[..., None]
        return ego_feature, ego_anchor, temp_feature, temp_anchor, temp_mask

    def cache(self, det_out: dict, ego_feature: torch.Tensor, ego_status: torch.Tensor, metas: dict) -> None:
        """After the motion layers: what the next frame matches against and the refined ego feature."""
        confidence = det_out["classification"][-1].detach().sigmoid().max(dim=-1).values
        self.prev_confidence = confidence
        self.prev_instance_id = _instance_ids(det_out)
        self.prev_timestamp = metas["timestamp"].detach()
        self.prev_T_global = metas["T_global"].detach()
        self.prev_ego_status = ego_status.detach()
        self.ego_feature_queue[-1] = ego_feature.detach()

    # ------------------------------------------------------------------ helpers

    def _continuing_slots(self, bs: int, metas: dict) -> torch.Tensor | None:
        """(bs,) True where the slot continues last frame's sequence; None when nothing usable is cached."""
        if self.period is None or self.period.shape[0] != bs or self.prev_timestamp is None:
            return None
        dt = metas["timestamp"] - self.prev_timestamp
        continues = dt.abs() <= self.max_time_interval
        if self.pending_reset is not None:
            if self.pending_reset.shape != (bs,):
                raise ValueError(f"reset slots {tuple(self.pending_reset.shape)} for a batch of {bs}")
            continues = continues & ~self.pending_reset.to(continues.device)
        return continues

    def _project_queues(self, metas: dict) -> None:
        """Move every queued box from last frame's lidar frame into this one."""
        t_prev2cur = metas["T_global_inv"].to(torch.float64) @ self.prev_T_global.to(torch.float64)

        def project(anchor: torch.Tensor) -> torch.Tensor:
            no_motion = anchor.new_zeros(anchor.shape[0])
            return KeyPointsGenerator.anchor_projection(anchor, t_prev2cur, no_motion, fix_yaw_swap=True)

        self.anchor_queue = [project(a) for a in self.anchor_queue]
        self.ego_anchor_queue = [project(a) for a in self.ego_anchor_queue]

    def _push_agents(self, det_out: dict, continues: torch.Tensor) -> None:
        feature = det_out["instance_feature"].detach()
        anchor = det_out["prediction"][-1].detach()
        if self.period is None:
            self.period = torch.zeros(feature.shape[:2], dtype=torch.long, device=feature.device)
        else:
            match = self._match(_instance_ids(det_out), continues)  # (bs, N, N_prev)
            found = match.any(dim=-1)
            source = match.long().argmax(dim=-1)  # the matched previous query (ids are unique per frame)
            self.feature_queue = [_take(f, source, found) for f in self.feature_queue]
            self.anchor_queue = [_take(a, source, found) for a in self.anchor_queue]
            self.period = torch.where(found, self.period.gather(1, source), self.period.new_zeros(()))
        self.feature_queue.append(feature)
        self.anchor_queue.append(anchor)
        self.period = self.period + 1
        if len(self.feature_queue) > self.queue_length:
            self.feature_queue.pop(0)
            self.anchor_queue.pop(0)
        self.period = self.period.clamp(0, self.queue_length)

    def _match(self, instance_id: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
        """(bs, N, N_prev) bool: current query n continues previous query m."""
        prev_id = self.prev_instance_id.to(instance_id.device)
        match = (instance_id[:, :, None] == prev_id[:, None, :]) & (instance_id[:, :, None] >= 0)
        if self.tracking_threshold > 0:
            match = match & (self.prev_confidence > self.tracking_threshold)[:, None, :]
        return match & continues[:, None, None]

    def _push_ego(self, feature_maps: list[torch.Tensor], continues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        front = feature_maps[-1][:, self.front_cam]  # (bs, C, H, W): coarsest level, front camera
        ego_feature = self.ego_feature_encoder(front).flatten(1)[:, None]
        bs = ego_feature.shape[0]
        ego_anchor = self.ego_anchor[None].repeat(bs, 1, 1)
        if self.prev_ego_status is not None:
            speed = self.prev_ego_status[:, :, EGO_STATUS_SPEED]
            ego_anchor[..., VY] = torch.where(continues[:, None], speed, speed.new_zeros(()))
        if self.ego_period is None:
            self.ego_period = torch.zeros(bs, 1, dtype=torch.long, device=ego_feature.device)
        else:
            self.ego_period = torch.where(continues[:, None], self.ego_period, self.ego_period.new_zeros(()))
        self.ego_feature_queue.append(ego_feature.detach())
        self.ego_anchor_queue.append(ego_anchor.detach())
        self.ego_period = (self.ego_period + 1).clamp(0, self.queue_length)
        if len(self.ego_feature_queue) > self.queue_length:
            self.ego_feature_queue.pop(0)
            self.ego_anchor_queue.pop(0)
        return ego_feature, ego_anchor


def _take(queued: torch.Tensor, source: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """queued (bs, N_prev, D) re-indexed to the current queries: row `source`, zeros where not `found`."""
    rows = torch.gather(queued, 1, source[..., None].expand(-1, -1, queued.shape[-1]))
    return torch.where(found[..., None], rows, rows.new_zeros(()))


def _instance_ids(det_out: dict) -> torch.Tensor:
    """The detection head's tracking ids, or all -1 (nothing tracks) when it gives none."""
    ids = det_out.get("instance_id")
    if ids is None:
        feature = det_out["instance_feature"]
        return torch.full(feature.shape[:2], -1, dtype=torch.long, device=feature.device)
    return ids
