"""SparseDrive motion planner: upstream key names and shapes, output shapes, the instance queue's
tracking and resets, best-mode losses, collision-aware plan selection and the temporal state."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import upstream_keys

from raydrive.models.sparse4d.blocks import AnchorEncoder
from raydrive.models.sparsedrive.motion import MotionConfig, MotionPlanningHead, boxes_collide
from raydrive.models.sparsedrive.motion_target import motion_loss

PREFIX = "head.motion_plan_head."
BS, N, NUM_MAP, C = 2, 12, 6, 32


def tiny_cfg(**kw) -> MotionConfig:
    return MotionConfig(embed_dims=C, num_heads=4, num_det=4, num_map=3, **kw)


def make_head(seed: int = 0, **kw) -> MotionPlanningHead:
    torch.manual_seed(seed)
    motion_anchor = torch.randn(10, 6, 12, 2).cumsum(dim=-2).numpy()
    plan_anchor = torch.randn(3, 6, 6, 2).cumsum(dim=-2).numpy()
    return MotionPlanningHead(tiny_cfg(**kw), motion_anchor, plan_anchor).eval()


def anchor_encoder() -> AnchorEncoder:
    torch.manual_seed(1)
    return AnchorEncoder((16, 4, 4, 8)).eval()


def det_out(seed: int, ids: torch.Tensor | None = None, conf_logit: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.randn(BS, N, 11, generator=g)
    cls = torch.full((BS, N, 10), -5.0)
    cls[..., 0] = conf_logit
    out = {
        "instance_feature": torch.randn(BS, N, C, generator=g),
        "anchor_embed": torch.randn(BS, N, C, generator=g),
        "classification": [cls],
        "prediction": [boxes],
    }
    if ids is not None:
        out["instance_id"] = ids
    return out


def map_out(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "instance_feature": torch.randn(BS, NUM_MAP, C, generator=g),
        "anchor_embed": torch.randn(BS, NUM_MAP, C, generator=g),
        "classification": [torch.randn(BS, NUM_MAP, 3, generator=g)],
    }


def feature_maps(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 200)
    return [torch.randn(BS, 2, C, 4, 6, generator=g)]


def metas(t: float, shift_x: float = 0.0) -> dict:
    pose = torch.eye(4, dtype=torch.float64).repeat(BS, 1, 1)
    pose[:, 0, 3] = shift_x
    return {
        "timestamp": torch.full((BS,), t, dtype=torch.float64),
        "T_global": pose,
        "T_global_inv": torch.linalg.inv(pose),
        "gt_ego_fut_cmd": torch.eye(3)[[2, 0]],
    }


def ids_of(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def step(head, frame: int, ids=None, **kw) -> dict:
    return head(det_out(frame, ids), map_out(frame), feature_maps(frame), metas(0.5 * frame, **kw), anchor_encoder())


def test_state_dict_matches_upstream_keys():
    expected = upstream_keys("sparsedrive_small_stage2.txt", PREFIX)
    head = MotionPlanningHead(MotionConfig())
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == expected


def test_forward_shapes_and_plan_decode():
    head = make_head()
    step(head, 0, ids_of(range(N), range(N)))
    out = step(head, 1, ids_of(range(N), range(N)))
    assert out["motion_classification"].shape == (BS, N, 6)
    assert out["motion_prediction"].shape == (BS, N, 6, 12, 2)
    assert out["planning_classification"].shape == (BS, 1, 18)
    assert out["planning_prediction"].shape == (BS, 1, 18, 6, 2)
    assert out["planning_status"].shape == (BS, 1, 10)
    assert torch.isfinite(out["motion_prediction"]).all()
    boxes = torch.randn(5, 9)
    dets = [{"boxes": boxes, "query_index": torch.arange(5)}, {"boxes": boxes}]
    res = head.decode(out, dets)
    assert res[0]["trajs"].shape == (5, 6, 12, 2) and res[0]["traj_scores"].shape == (5, 6)
    assert res[1]["plan"].shape == (6, 2) and res[1]["plan_scores"].shape == (18,)
    # cumulative and placed at the box
    first = out["motion_prediction"][0, :5, :, 0] + boxes[:, None, :2]
    torch.testing.assert_close(res[0]["trajs"][:, :, 0], first)
    # the plan comes from the command's group (frame 0: straight = group 2, frame 1: right = group 0)
    plans = out["planning_prediction"][0, 0].reshape(3, 6, 6, 2).cumsum(dim=-2)
    assert any(torch.allclose(res[0]["plan"], p) for p in plans[2])


def test_queue_follows_tracking_ids_and_drops_on_reset():
    head = make_head()
    q = head.instance_queue
    frame0 = det_out(0, ids_of(range(N), range(N)))
    conf_logit = torch.full((BS, N, 10), -5.0)
    conf_logit[..., 0] = 3.0
    conf_logit[:, 5, 0] = -3.0  # query 5 was not confident: its track is not continued
    frame0["classification"] = [conf_logit]
    head(frame0, map_out(0), feature_maps(0), metas(0.0), anchor_encoder())

    perm = torch.roll(torch.arange(N), 3)  # query q now carries the id of previous query perm[q]
    frame1 = det_out(1, torch.stack([perm, perm]))
    _, _, temp_feature, temp_anchor, temp_mask = q.get(frame1, feature_maps(1), metas(0.5))
    for qi in range(N):
        prev = int(perm[qi])
        if prev == 5:
            assert q.period[0, qi] == 1 and temp_mask[0, qi].tolist() == [True, False]
            assert torch.all(temp_feature[0, qi, 0] == 0)
        else:
            assert q.period[0, qi] == 2 and not temp_mask[0, qi].any()
            torch.testing.assert_close(temp_feature[0, qi, 0], frame0["instance_feature"][0, prev])
            torch.testing.assert_close(temp_anchor[0, qi, 0, :3], frame0["prediction"][-1][0, prev, :3])
    q.cache(frame1, torch.zeros(BS, 1, C), torch.zeros(BS, 1, 10), metas(0.5))

    # slot 1 starts a new scene: its histories go, slot 0 keeps them (same ids again)
    head.reset(torch.tensor([False, True]))
    frame2 = det_out(2, torch.stack([perm, perm]))
    _, _, _, _, temp_mask = q.get(frame2, feature_maps(2), metas(1.0))
    assert temp_mask.shape == (BS, N + 1, 3)
    assert (q.period[1] == 1).all() and q.ego_period[1] == 1
    assert q.period[0].max() == 3 and q.ego_period[0] == 3
    assert temp_mask[1, :, :2].all() and not temp_mask[0, 0].any()


def test_queue_moves_anchors_into_the_current_frame():
    head = make_head()
    ids = ids_of(range(N), range(N))
    step(head, 0, ids)
    first = det_out(0)["prediction"][-1]
    _, _, _, temp_anchor, _ = head.instance_queue.get(det_out(1, ids), feature_maps(1), metas(0.5, shift_x=2.0))
    # the ego moved 2 m along global x: old boxes sit 2 m further back
    torch.testing.assert_close(temp_anchor[:, :N, 0, 0], first[..., 0] - 2.0)
    torch.testing.assert_close(temp_anchor[:, :N, 0, 1], first[..., 1])


def test_time_gap_drops_history():
    head = make_head()
    ids = ids_of(range(N), range(N))
    step(head, 0, ids)
    head(det_out(1, ids), map_out(1), feature_maps(1), metas(5.0), anchor_encoder())  # 5 s later
    assert (head.instance_queue.period == 1).all() and (head.instance_queue.ego_period == 1).all()


def test_motion_loss_picks_the_best_mode():
    torch.manual_seed(0)
    reg = torch.randn(1, 4, 6, 12, 2)
    gt = torch.randn(3, 12, 2)
    masks = torch.ones(3, 12)
    masks[2, 6:] = 0
    indices = [(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2]))]
    reg[0, 0, 4], reg[0, 2, 1] = gt[0], gt[1]
    reg[0, 3, 5, :6] = gt[2, :6]  # only the valid steps agree; the masked tail does not count
    cls = torch.zeros(1, 4, 6)
    losses = motion_loss(cls, reg, indices, [gt], [masks])
    assert losses["loss_motion_reg"].abs() < 1e-6
    cls_good = cls.clone()
    cls_good[0, 0, 4] = cls_good[0, 2, 1] = cls_good[0, 3, 5] = 5.0
    assert motion_loss(cls_good, reg, indices, [gt], [masks])["loss_motion_cls"] < losses["loss_motion_cls"]
    reg[0, 0, 4] += 1.0
    assert motion_loss(cls, reg, indices, [gt], [masks])["loss_motion_reg"] > 0


def test_plan_loss_terms():
    head = make_head()
    out = step(head, 0, ids_of(range(N), range(N)))
    targets = {
        "gt_agent_fut_trajs": [torch.randn(2, 12, 2), torch.zeros(0, 12, 2)],
        "gt_agent_fut_masks": [torch.ones(2, 12), torch.zeros(0, 12)],
        "gt_ego_fut_trajs": torch.randn(BS, 6, 2),
        "gt_ego_fut_masks": torch.ones(BS, 6),
        "gt_ego_fut_cmd": torch.eye(3)[[2, 0]],
        "ego_status": torch.randn(BS, 10),
    }
    indices = [(torch.tensor([3, 7]), torch.tensor([1, 0])), None]
    losses = head.loss(out, indices, targets)
    assert set(losses) == {"loss_motion_cls", "loss_motion_reg", "loss_plan_cls", "loss_plan_reg", "loss_plan_status"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert head.layers[-1].plan_reg_branch[-1].weight.grad.abs().sum() > 0


def test_plan_selection_avoids_a_colliding_mode():
    head = make_head()
    bs, n = 1, 3
    plan_offsets = torch.zeros(bs, 1, 3, 6, 6, 2)
    plan_offsets[0, 0, 2, 0, :, 1] = 2.0  # straight group, mode 0: 12 m ahead
    plan_offsets[0, 0, 2, 1, :, 0] = 1.5  # mode 1: sideways to the right
    plan_offsets[0, 0, 2, 1, :, 1] = 0.5
    plan_cls = torch.zeros(bs, 1, 3, 6)
    plan_cls[0, 0, 2, 0], plan_cls[0, 0, 2, 1] = 3.0, 2.0
    det_box = torch.zeros(bs, n, 11)
    det_box[..., 3:6] = math.log(2.0)
    det_box[..., 6], det_box[..., 7] = 1.0, 0.0  # heading +y
    det_box[0, :, 0] = torch.tensor([0.0, -20.0, 20.0])
    det_box[0, :, 1] = torch.tensor([8.0, 0.0, 0.0])  # agent 0 stands 8 m ahead
    det_cls = torch.full((bs, n, 10), 3.0)
    out = {
        "planning_classification": plan_cls.flatten(2),
        "planning_prediction": plan_offsets.flatten(2, 3),
        "motion_classification": torch.zeros(bs, n, 6),
        "motion_prediction": torch.zeros(bs, n, 6, 12, 2),  # everyone stands still
        "det_classification": det_cls,
        "det_prediction": det_box,
    }
    cmd = torch.eye(3)[[2]]
    res = head.decode(out, [{"boxes": torch.zeros(0, 9)}], cmd)[0]
    torch.testing.assert_close(res["plan"], plan_offsets[0, 0, 2, 1].cumsum(dim=0))
    assert res["plan_scores"][12] < 1e-6 and res["plan_scores"][13] > 0.5
    # an unconfident agent is ignored: the best-scored mode stays
    out["det_classification"] = torch.full((bs, n, 10), -3.0)
    res = head.decode(out, [{"boxes": torch.zeros(0, 9)}], cmd)[0]
    torch.testing.assert_close(res["plan"], plan_offsets[0, 0, 2, 0].cumsum(dim=0))


def test_boxes_collide():
    a = torch.tensor([0.0, 0.0, 4.0, 2.0, 0.0])
    assert boxes_collide(a, torch.tensor([3.0, 0.0, 4.0, 2.0, 0.0]))
    assert not boxes_collide(a, torch.tensor([0.0, 3.0, 4.0, 2.0, 0.0]))
    assert boxes_collide(a, torch.tensor([0.0, 2.5, 4.0, 2.0, math.pi / 2]))  # rotated: reaches down to y=0.5


@pytest.mark.parametrize("reset_first", [False, True])
def test_state_round_trip(reset_first):
    a, b = make_head(), make_head()
    ids = ids_of(range(N), range(N))
    step(a, 0, ids)
    step(a, 1, ids)
    if reset_first:
        a.reset(torch.tensor([True, False]))
    b.load_state(a.state())
    out_a, out_b = step(a, 2, ids), step(b, 2, ids)
    for key in ("motion_prediction", "planning_prediction", "planning_status"):
        torch.testing.assert_close(out_a[key], out_b[key])
    assert torch.equal(a.instance_queue.period, b.instance_queue.period)
    b.load_state({})
    assert b.state() == {}
