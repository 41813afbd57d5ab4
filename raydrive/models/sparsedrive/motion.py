"""SparseDrive's motion planner: agent motion forecasting and ego planning on top of the detection and
map heads (stage 2).

Behaviour from swc-17/SparseDrive `projects/mmdet3d_plugin/models/motion/{motion_planning_head.py,
motion_blocks.py, decoder.py}` and `motion_plan_head` in `projects/configs/sparsedrive_small_stage2.py`:
- queries: the 900 detection instances plus one ego instance (see `instance_queue.py`);
- mode queries: each agent's class k-means trajectories, rotated by its box yaw, and the plan k-means
  trajectories; their end points go through a sine embedding and an MLP;
- 3 x [temp_gnn (each instance over its own queue), gnn (over the top-50 detections and the ego),
  norm, cross_gnn (over the top-10 map instances), norm, ffn, norm], then one refine layer; the two
  graph attentions are decoupled (position concatenated, 512-d), the map one adds it (256-d);
- decoding: agent trajectories are accumulated and placed at their boxes; the plan is the best mode
  of the command's group after modes that run into a confident agent's likeliest trajectory are
  rescored by -999 (unless all of them do).

What raydrive does differently: upstream shifts "the ego box 0.5 m forward" in its collision check
with `ego_box[0] += ...cos(ego_box[6])`, which indexes boxes instead of coordinates; here each ego box
moves 0.5 m along its heading, as intended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raydrive.models.sparse4d.blocks import (
    CNS,
    COS_YAW,
    SIN_YAW,
    AsymmetricFFN,
    L,
    W,
    X,
    Y,
    linear_relu_ln,
    xavier_init_except_refine,
)
from raydrive.models.sparse4d.head import _topk
from raydrive.models.sparsedrive.instance_queue import EGO_SIZE, InstanceQueue
from raydrive.models.sparsedrive.motion_target import motion_loss, planning_loss
from raydrive.models.streampetr.head import pos2posemb1d

LAYER_OPS = ("temp_gnn", "gnn", "norm", "cross_gnn", "norm", "ffn", "norm")


@dataclass
class MotionConfig:
    """Defaults are upstream's stage-2 `motion_plan_head`."""

    embed_dims: int = 256
    num_heads: int = 8
    dropout: float = 0.1
    num_layers: int = 3
    decouple_attn: bool = True  # temp_gnn and gnn; cross_gnn never is
    queue_length: int = 4  # frames, the current one included
    tracking_threshold: float = 0.2
    max_time_interval: float = 2.0  # seconds; a longer gap starts a new sequence
    front_cam: int = 0  # the camera whose coarsest map feeds the ego feature
    num_classes: int = 10
    fut_ts: int = 12  # agent steps (6 s at 2 Hz)
    fut_mode: int = 6
    ego_fut_ts: int = 6  # ego steps (3 s)
    ego_fut_mode: int = 6  # per command
    num_cmd: int = 3  # right, left, straight
    ego_status_dims: int = 10
    num_det: int = 50  # detections the agent graph attends to (plus the ego)
    num_map: int = 10  # map instances the cross attention attends to
    motion_cls_weight: float = 0.2
    motion_reg_weight: float = 0.2
    plan_cls_weight: float = 0.5
    plan_reg_weight: float = 1.0
    plan_status_weight: float = 1.0
    rescore: bool = True  # collision-aware plan selection at decode time
    collision_score_thresh: float = 0.5  # agents less confident than this are ignored
    collision_dim_scale: float = 1.1  # the ego box is inflated by this factor
    collision_ego_offset: float = 0.5  # metres from the lidar forward to the ego box centre
    static_dist_thresh: float = 0.5  # trajectories shorter than this keep their start heading


class _Attention(nn.Module):
    """mmcv MultiheadAttention semantics: identity + dropout(MHA(query, key, value)); positions are
    added or concatenated by the caller."""

    def __init__(self, embed_dims: int, num_heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key, value, identity, key_padding_mask=None):
        out = self.attn(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return identity + self.dropout(out)


def _mlp_head(embed_dims: int, out_dims: int) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear (upstream's regression branches)."""
    return nn.Sequential(
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, out_dims),
    )


class MotionPlanningRefinement(nn.Module):
    """Mode scores and trajectories (offsets) for agents and ego, and the ego status."""

    def __init__(self, cfg: MotionConfig):
        super().__init__()
        d = cfg.embed_dims
        self.cfg = cfg
        self.motion_cls_branch = nn.Sequential(*linear_relu_ln(d, 1, 2), nn.Linear(d, 1))
        self.motion_reg_branch = _mlp_head(d, cfg.fut_ts * 2)
        self.plan_cls_branch = nn.Sequential(*linear_relu_ln(d, 1, 2), nn.Linear(d, 1))
        self.plan_reg_branch = _mlp_head(d, cfg.ego_fut_ts * 2)
        self.plan_status_branch = _mlp_head(d, cfg.ego_status_dims)

    def init_weights(self):
        prior = -math.log((1 - 0.01) / 0.01)  # sigmoid = 0.01 at start
        nn.init.constant_(self.motion_cls_branch[-1].bias, prior)
        nn.init.constant_(self.plan_cls_branch[-1].bias, prior)

    def forward(self, motion_query, plan_query, ego_feature, ego_anchor_embed):
        """motion_query (bs, N, M, C), plan_query (bs, 1, K*M, C), ego (bs, 1, C)."""
        c = self.cfg
        bs, num = motion_query.shape[:2]
        motion_cls = self.motion_cls_branch(motion_query).squeeze(-1)
        motion_reg = self.motion_reg_branch(motion_query).reshape(bs, num, c.fut_mode, c.fut_ts, 2)
        plan_cls = self.plan_cls_branch(plan_query).squeeze(-1)
        plan_reg = self.plan_reg_branch(plan_query).reshape(bs, 1, c.num_cmd * c.ego_fut_mode, c.ego_fut_ts, 2)
        status = self.plan_status_branch(ego_feature + ego_anchor_embed)
        return motion_cls, motion_reg, plan_cls, plan_reg, status


def sine_embed_2d(pos: torch.Tensor, dims: int) -> torch.Tensor:
    """(..., 2) metres -> (..., dims): sine embeddings of y then x (DAB-DETR's, as upstream)."""
    return torch.cat([pos2posemb1d(pos[..., 1:2], dims // 2), pos2posemb1d(pos[..., 0:1], dims // 2)], dim=-1)


def rotate_trajs(trajs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Agent-frame trajectories (bs, N, M, T, 2) into the lidar frame by each box's yaw (bs, N, 11)."""
    yaw = torch.atan2(boxes[..., SIN_YAW], boxes[..., COS_YAW])[..., None, None]
    cos, sin = yaw.cos(), yaw.sin()
    x, y = trajs[..., 0], trajs[..., 1]
    return torch.stack([x * cos - y * sin, x * sin + y * cos], dim=-1)


class MotionPlanningHead(nn.Module):
    """See the module docstring. `motion_anchor` (classes, modes, fut_ts, 2) and `plan_anchor` (commands,
    modes, ego_fut_ts, 2) are raydrive's k-means assets (cumulative), or None for zeros."""

    def __init__(
        self,
        cfg: MotionConfig | None = None,
        motion_anchor: np.ndarray | None = None,
        plan_anchor: np.ndarray | None = None,
    ):
        super().__init__()
        c = self.cfg = cfg or MotionConfig()
        d = c.embed_dims
        self.instance_queue = InstanceQueue(d, c.queue_length, c.tracking_threshold, c.max_time_interval, c.front_cam)
        self.operation_order = list(LAYER_OPS) * c.num_layers + ["refine"]
        graph_dims = 2 * d if c.decouple_attn else d
        build = {
            "temp_gnn": lambda: _Attention(graph_dims, c.num_heads, c.dropout),
            "gnn": lambda: _Attention(graph_dims, c.num_heads, c.dropout),
            "cross_gnn": lambda: _Attention(d, c.num_heads, c.dropout),
            "norm": lambda: nn.LayerNorm(d),
            "ffn": lambda: AsymmetricFFN(d, d, 2 * d, c.dropout),
            "refine": lambda: MotionPlanningRefinement(c),
        }
        self.layers = nn.ModuleList(build[op]() for op in self.operation_order)
        if c.decouple_attn:
            self.fc_before = nn.Linear(d, 2 * d, bias=False)
            self.fc_after = nn.Linear(2 * d, d, bias=False)
        shapes = {
            "motion_anchor": (c.num_classes, c.fut_mode, c.fut_ts, 2),
            "plan_anchor": (c.num_cmd, c.ego_fut_mode, c.ego_fut_ts, 2),
        }
        for name, value in (("motion_anchor", motion_anchor), ("plan_anchor", plan_anchor)):
            array = np.zeros(shapes[name], np.float32) if value is None else np.asarray(value, np.float32)
            if array.shape != shapes[name]:
                raise ValueError(f"{name} has shape {array.shape}, the config needs {shapes[name]}")
            self.register_parameter(name, nn.Parameter(torch.from_numpy(array.copy()), requires_grad=False))
        self.motion_anchor_encoder = nn.Sequential(*linear_relu_ln(d, 1, 1), nn.Linear(d, d))
        self.plan_anchor_encoder = nn.Sequential(*linear_relu_ln(d, 1, 1), nn.Linear(d, d))
        self.init_weights()

    def init_weights(self):
        xavier_init_except_refine(self.operation_order, self.layers)
        self.layers[-1].init_weights()

    # ------------------------------------------------------------------ temporal state

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """None: forget all; a bool (bs,) tensor: those slots start a new sequence at the next forward."""
        self.instance_queue.reset(slots)

    def state(self) -> dict[str, torch.Tensor]:
        return self.instance_queue.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.instance_queue.load_state(state)

    # ------------------------------------------------------------------ forward

    def _graph(self, index, query, query_pos, key, key_pos, value, key_padding_mask=None):
        """temp_gnn / gnn: decoupled (concatenated position, 2C wide) when configured, else added."""
        layer = self.layers[index]
        if not self.cfg.decouple_attn:
            return layer(query + query_pos, key + key_pos, value, query, key_padding_mask)
        query = torch.cat([query, query_pos], dim=-1)
        key = torch.cat([key, key_pos], dim=-1)
        return self.fc_after(layer(query, key, self.fc_before(value), query, key_padding_mask))

    def _mode_queries(self, det_cls: torch.Tensor, det_box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bs, N, M, C) agent and (bs, 1, K*M, C) ego mode queries from the anchor trajectories' ends."""
        d = self.cfg.embed_dims
        motion_anchor = rotate_trajs(self.motion_anchor[det_cls.argmax(dim=-1)], det_box.detach())
        motion_query = self.motion_anchor_encoder(sine_embed_2d(motion_anchor[..., -1, :], d))
        plan_end = self.plan_anchor[..., -1, :].expand(det_cls.shape[0], -1, -1, -1)
        plan_query = self.plan_anchor_encoder(sine_embed_2d(plan_end, d)).flatten(1, 2).unsqueeze(1)
        return motion_query, plan_query

    def forward(
        self,
        det_out: dict,
        map_out: dict,
        feature_maps: list[torch.Tensor],
        metas: dict,
        anchor_encoder: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict:
        """det_out: `instance_feature`, `anchor_embed` (bs, N, C), `classification` / `prediction` lists
        (last used), `instance_id` (bs, N) (-1 = none; all -1 if absent); map_out: `instance_feature`,
        `anchor_embed`, `classification`; feature_maps: per level (bs, cams, C, H, W); metas:
        `timestamp` (bs,), `T_global`, `T_global_inv` (bs, 4, 4), optionally `gt_ego_fut_cmd` (bs, K)
        for decoding; anchor_encoder: the detection head's (boxes -> embeddings)."""
        c = self.cfg
        feature, embed = det_out["instance_feature"], det_out["anchor_embed"]
        bs, num, d = feature.shape
        det_cls, det_box = det_out["classification"][-1], det_out["prediction"][-1]
        _, (det_sel, det_embed_sel) = _topk(det_cls.sigmoid().max(dim=-1).values, c.num_det, feature, embed)
        map_conf = map_out["classification"][-1].sigmoid().max(dim=-1).values
        _, (map_sel, map_embed_sel) = _topk(map_conf, c.num_map, map_out["instance_feature"], map_out["anchor_embed"])

        ego_feature, ego_anchor, temp_feature, temp_anchor, temp_mask = self.instance_queue.get(
            det_out, feature_maps, metas
        )
        ego_embed = anchor_encoder(ego_anchor)
        temp_feature, temp_embed = temp_feature.flatten(0, 1), anchor_encoder(temp_anchor).flatten(0, 1)
        temp_mask = temp_mask.flatten(0, 1)
        motion_query, plan_query = self._mode_queries(det_cls, det_box)

        det_sel = torch.cat([det_sel, ego_feature], dim=1)
        det_embed_sel = torch.cat([det_embed_sel, ego_embed], dim=1)
        feature = torch.cat([feature, ego_feature], dim=1)
        embed = torch.cat([embed, ego_embed], dim=1)
        for i, op in enumerate(self.operation_order):
            layer = self.layers[i]
            if op == "temp_gnn":  # every instance (agents and ego) attends to its own queue
                query, pos = feature.reshape(-1, 1, d), embed.reshape(-1, 1, d)
                out = self._graph(i, query, pos, temp_feature, temp_embed, temp_feature, temp_mask)
                feature = out.reshape(bs, num + 1, d)
            elif op == "gnn":
                feature = self._graph(i, feature, embed, det_sel, det_embed_sel, det_sel)
            elif op in ("norm", "ffn"):
                feature = layer(feature)
            elif op == "cross_gnn":
                feature = layer(feature + embed, map_sel + map_embed_sel, map_sel, feature)
            else:  # refine
                both = feature + embed
                motion_cls, motion_reg, plan_cls, plan_reg, status = layer(
                    motion_query + both[:, :num, None],
                    plan_query + both[:, num:, None],
                    feature[:, num:],
                    embed[:, num:],
                )
        self.instance_queue.cache(det_out, feature[:, num:], status, metas)
        out = {
            "motion_classification": motion_cls,
            "motion_prediction": motion_reg,
            "planning_classification": plan_cls,
            "planning_prediction": plan_reg,
            "planning_status": status,
            # what decode() needs from the detection head
            "det_classification": det_cls.detach(),
            "det_prediction": det_box.detach(),
        }
        quality = det_out.get("quality")
        if quality is not None and quality[-1] is not None:
            out["det_quality"] = quality[-1].detach()
        if "gt_ego_fut_cmd" in metas:
            out["command"] = metas["gt_ego_fut_cmd"]
        return out

    # ------------------------------------------------------------------ loss

    def loss(
        self, out: dict, det_indices: list[tuple[torch.Tensor, torch.Tensor] | None], targets: dict
    ) -> dict[str, torch.Tensor]:
        """det_indices: per frame (pred_idx, gt_idx) of the detection head's last-layer match (None: no
        GT); targets: `gt_agent_fut_trajs` / `gt_agent_fut_masks` lists of (n, T, 2) / (n, T) offsets,
        `gt_ego_fut_trajs` (bs, T', 2), `gt_ego_fut_masks` (bs, T'), `gt_ego_fut_cmd` (bs, K),
        `ego_status` (bs, 10)."""
        c = self.cfg
        losses = motion_loss(
            out["motion_classification"],
            out["motion_prediction"],
            det_indices,
            targets["gt_agent_fut_trajs"],
            targets["gt_agent_fut_masks"],
            c.motion_cls_weight,
            c.motion_reg_weight,
        )
        losses.update(
            planning_loss(
                out["planning_classification"],
                out["planning_prediction"],
                out["planning_status"],
                targets["gt_ego_fut_trajs"],
                targets["gt_ego_fut_masks"],
                targets["gt_ego_fut_cmd"],
                targets["ego_status"],
                c.num_cmd,
                c.plan_cls_weight,
                c.plan_reg_weight,
                c.plan_status_weight,
            )
        )
        return losses

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def decode(self, out: dict, det_results: list[dict], command: torch.Tensor | None = None) -> list[dict]:
        """Per frame: `trajs` (n, M, T, 2) cumulative lidar-frame trajectories of the decoded boxes,
        `traj_scores` (n, M), `plan` (T', 2) the selected cumulative ego trajectory, `plan_scores` (K*M,)
        (the command's group rescored). det_results: the detection decode per frame (`boxes` (n, 9); a
        `query_index` (n,) if given, else recomputed as Sparse4DHead.decode picks them); command (bs, K)
        one-hot, default `out["command"]`."""
        command = out.get("command") if command is None else command
        if command is None:
            raise ValueError("planning needs the driving command: metas['gt_ego_fut_cmd'] or `command`")
        plan_cls, plan = self.select_plan(out, command)
        motion_scores = out["motion_classification"].sigmoid()
        results = []
        decoded = None
        for i, det in enumerate(det_results):
            index = det.get("query_index")
            if index is None:
                if decoded is None:
                    decoded = _decoded_queries(out, len(det["boxes"]))
                index = decoded[i]
            index = index.to(motion_scores.device)
            centre = det["boxes"][:, None, None, :2].to(motion_scores)
            trajs = out["motion_prediction"][i, index].cumsum(dim=-2) + centre
            results.append(
                {
                    "trajs": trajs.cpu(),
                    "traj_scores": motion_scores[i, index].cpu(),
                    "plan": plan[i].cpu(),
                    "plan_scores": plan_cls[i].sigmoid().flatten().cpu(),
                }
            )
        return results

    def select_plan(self, out: dict, command: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bs, K, M) plan logits with the command's group rescored, and the (bs, T', 2) chosen plan."""
        c = self.cfg
        bs = out["planning_classification"].shape[0]
        rows = torch.arange(bs, device=command.device)
        cmd = command.argmax(dim=-1).to(out["planning_classification"].device)
        rows = rows.to(cmd.device)
        logits = out["planning_classification"].reshape(bs, c.num_cmd, c.ego_fut_mode).clone()
        plans = out["planning_prediction"].reshape(bs, c.num_cmd, c.ego_fut_mode, c.ego_fut_ts, 2).cumsum(dim=-2)
        group_logits, group_plans = logits[rows, cmd], plans[rows, cmd]
        if c.rescore:
            collide = self.plan_collisions(group_plans, out)
            group_logits = group_logits - 999.0 * collide.to(group_logits.dtype)
        logits[rows, cmd] = group_logits
        best = group_logits.argmax(dim=-1)
        return logits, group_plans[rows, best]

    def plan_collisions(self, plans: torch.Tensor, out: dict) -> torch.Tensor:
        """(bs, M) True where a plan (bs, M, T, 2, cumulative) hits the likeliest trajectory of an agent
        above the score threshold at some step; all False for a frame where every mode does."""
        c = self.cfg
        det_box = out["det_prediction"]
        confident = out["det_classification"].sigmoid().max(dim=-1).values >= c.collision_score_thresh
        steps = plans.shape[-2]

        ego_xy = _with_start(plans)  # (bs, M, T + 1, 2)
        ego_yaw = _traj_yaw(ego_xy, plans.new_tensor(math.pi / 2), c.static_dist_thresh)
        ego_xy = ego_xy + c.collision_ego_offset * torch.stack([ego_yaw.cos(), ego_yaw.sin()], dim=-1)
        ego_size = plans.new_tensor(EGO_SIZE[:2]) * c.collision_dim_scale
        ego = _boxes(ego_xy, ego_size.expand(*ego_xy.shape[:-1], 2), ego_yaw)[:, :, 1:]  # (bs, M, T, 5)

        best_mode = out["motion_classification"].argmax(dim=-1)  # (bs, N)
        motion = out["motion_prediction"][..., :steps, :].cumsum(dim=-2)
        motion = torch.gather(motion, 2, best_mode[..., None, None, None].expand(-1, -1, 1, steps, 2)).squeeze(
            2
        )  # (bs, N, T, 2)
        agent_xy = _with_start(motion) + det_box[:, :, None, [X, Y]]
        start_yaw = torch.atan2(det_box[..., SIN_YAW], det_box[..., COS_YAW])
        agent_yaw = _traj_yaw(agent_xy, start_yaw, c.static_dist_thresh)
        agent_size = det_box[:, :, None, [W, L]].exp().expand(*agent_xy.shape[:-1], 2)
        agent = _boxes(agent_xy, agent_size, agent_yaw)[:, :, 1:]  # (bs, N, T, 5)

        hit = boxes_collide(ego[:, :, None], agent[:, None])  # (bs, M, N, T)
        hit = (hit & confident[:, None, :, None]).flatten(2).any(dim=-1)
        return hit & ~hit.all(dim=-1, keepdim=True)


# ---------------------------------------------------------------------- geometry helpers


def _with_start(traj: torch.Tensor) -> torch.Tensor:
    """Prepend the origin to cumulative trajectories (..., T, 2)."""
    return torch.cat([traj.new_zeros(*traj.shape[:-2], 1, 2), traj], dim=-2)


def _traj_yaw(traj: torch.Tensor, start_yaw: torch.Tensor, static_dist: float) -> torch.Tensor:
    """(..., T+1, 2) -> (..., T+1) headings: central differences inside, backward at the end, start_yaw
    (broadcast over the leading dims) first and everywhere for trajectories shorter than static_dist."""
    start = start_yaw.expand(traj.shape[:-2])
    inner = traj[..., 2:, :] - traj[..., :-2, :]
    last = traj[..., -1, :] - traj[..., -2, :]
    yaw = torch.cat(
        [
            start[..., None],
            torch.atan2(inner[..., 1], inner[..., 0]),
            torch.atan2(last[..., 1], last[..., 0])[..., None],
        ],
        dim=-1,
    )
    static = torch.linalg.norm(traj[..., -1, :] - traj[..., 0, :], dim=-1) < static_dist
    return torch.where(static[..., None], start[..., None], yaw)


def _boxes(xy: torch.Tensor, size: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """(..., 5) bird's-eye boxes: x, y, length along the heading, width, heading."""
    return torch.cat([xy, size, yaw[..., None]], dim=-1)


def _corners_inside(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether any footprint corner of box b lies inside box a (boxes as `_boxes`, broadcast)."""
    signs = a.new_tensor([[0.5, 0.5], [0.5, -0.5], [-0.5, -0.5], [-0.5, 0.5]])
    local = signs * b[..., None, 2:4]  # (..., 4, 2) corner offsets in b's frame
    cos_b, sin_b = b[..., 4:5].cos(), b[..., 4:5].sin()
    corners = (
        torch.stack(
            [local[..., 0] * cos_b - local[..., 1] * sin_b, local[..., 0] * sin_b + local[..., 1] * cos_b], dim=-1
        )
        + b[..., None, 0:2]
    )
    rel = corners - a[..., None, 0:2]
    cos_a, sin_a = a[..., 4:5].cos(), a[..., 4:5].sin()
    along = rel[..., 0] * cos_a + rel[..., 1] * sin_a
    across = -rel[..., 0] * sin_a + rel[..., 1] * cos_a
    inside = (along.abs() <= a[..., 2:3] / 2) & (across.abs() <= a[..., 3:4] / 2)
    return inside.any(dim=-1)


def boxes_collide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Upstream's rough test: a corner of either box inside the other (boxes as `_boxes`, broadcast)."""
    return _corners_inside(a, b) | _corners_inside(b, a)


def _decoded_queries(out: dict, count: int) -> torch.Tensor:
    """(bs, count) query indices as Sparse4DHead.decode picks them: top `count` by best-class score,
    re-sorted by score x sigmoid(centerness) when the head has a quality branch."""
    score = out["det_classification"].sigmoid().max(dim=-1).values
    scores, index = score.topk(count, dim=1)
    if "det_quality" in out:
        scores = scores * torch.gather(out["det_quality"][..., CNS], 1, index).sigmoid()
        _, order = scores.sort(dim=1, descending=True)
        index = torch.gather(index, 1, order)
    return index
