"""StreamPETR 2D branch (FocalHead): upstream keys, init, decoding, matching, heatmap and losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raydrive.models.streampetr.focal_head import (
    PRIOR_BIAS,
    FocalHead,
    HungarianAssigner2D,
    centerness_heatmap,
    feature_locations,
    quality_focal_loss,
    xyxy_to_cxcywh,
)

KEYS_DIR = Path(__file__).resolve().parent / "data"  # upstream key lists (copied from shared/specs/keys)
PAD = (64, 80)  # pad_hw of the small batches: 4 x 5 tokens at stride 16
N_CAMS = 3


def upstream_keys(name: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in (KEYS_DIR / name).read_text().splitlines():
        if line.startswith(prefix):
            key, shape = line.split(" ", 1)
            out.append((key[len(prefix) :], tuple(int(x) for x in shape.strip("() ").split(",") if x.strip())))
    return out


@pytest.mark.parametrize("name", ["streampetr_vov99_800.txt", "streampetr_r50_704.txt"])
def test_state_dict_is_upstream_img_roi_head_key_for_key(name):
    head = FocalHead(num_classes=10, in_channels=256, embed_dims=256)
    expected = upstream_keys(name, "img_roi_head.")
    assert len(expected) == 16
    assert [(k, tuple(v.shape)) for k, v in head.state_dict().items()] == expected


def test_init_sets_one_percent_prior_on_class_and_centerness():
    head = FocalHead(in_channels=32, embed_dims=32)
    assert PRIOR_BIAS == pytest.approx(-4.59512, abs=1e-5)
    assert torch.allclose(head.cls.bias, torch.full((10,), PRIOR_BIAS))
    assert torch.allclose(head.centerness.bias, torch.full((1,), PRIOR_BIAS))
    assert torch.equal(head.shared_cls[1].weight, torch.ones(32))


def small_head(**kw) -> FocalHead:
    torch.manual_seed(0)
    return FocalHead(num_classes=10, in_channels=32, embed_dims=32, **kw)


def small_batch(boxes_per_frame: list[list[tuple[int, tuple[float, float, float, float], int]]]) -> dict:
    """Frames of N_CAMS cameras; each box is (camera, xyxy px, label), its centre the box middle."""
    batch = {"pad_hw": torch.tensor([PAD] * len(boxes_per_frame)), "gt_cams2d": [], "gt_bboxes2d": []}
    batch.update(gt_labels2d=[], gt_centers2d=[], gt_depths2d=[])
    for boxes in boxes_per_frame:
        xyxy = torch.tensor([b[1] for b in boxes], dtype=torch.float32).reshape(-1, 4)
        batch["gt_cams2d"].append(torch.tensor([b[0] for b in boxes], dtype=torch.long))
        batch["gt_bboxes2d"].append(xyxy)
        batch["gt_labels2d"].append(torch.tensor([b[2] for b in boxes], dtype=torch.long))
        batch["gt_centers2d"].append((xyxy[:, :2] + xyxy[:, 2:]) / 2)
        batch["gt_depths2d"].append(torch.full((len(boxes),), 10.0))
    return batch


def test_forward_shapes_locations_and_topk():
    head = small_head()
    feats = torch.randn(2, N_CAMS, 32, 4, 5)
    batch = small_batch([[], []])
    out = head.eval()(feats, batch)
    assert out["enc_cls_scores"].shape == (6, 20, 10)
    assert out["enc_bbox_preds"].shape == (6, 20, 4)
    assert out["pred_centers2d"].shape == (6, 20, 2)
    assert out["centerness"].shape == (6, 20, 1)
    assert out["topk_indexes"] is None  # the configs' ratio 1.0 keeps every token
    boxes = out["enc_bbox_preds"]
    assert bool(((boxes[..., :2] >= 0) & (boxes[..., :2] <= 1) & (boxes[..., 2:] >= 0)).all())

    loc = feature_locations(4, 5, 16, PAD)
    assert torch.allclose(loc[2, 3], torch.tensor([(3 * 16 + 8) / 80, (2 * 16 + 8) / 64]))
    # a zero centre offset puts the 2D centre on the token's own location
    torch.nn.init.zeros_(head.center2d.weight)
    torch.nn.init.zeros_(head.center2d.bias)
    centers = head(feats, batch)["pred_centers2d"].reshape(6, 4, 5, 2)
    assert torch.allclose(centers, loc.expand_as(centers), atol=1e-5)

    sampler = small_head(train_ratio=0.5).train()
    out = sampler(feats, batch)
    top = out["topk_indexes"]
    assert top.shape == (2, 30, 1)
    score = out["enc_cls_scores"].max(-1).values.sigmoid() * out["centerness"][..., 0].sigmoid()
    score = score.reshape(2, -1)
    kept_min = score.gather(1, top[..., 0]).min(dim=1).values
    dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, top[..., 0], False)
    assert bool((score.masked_fill(~dropped, -1).max(dim=1).values <= kept_min).all())


def test_quality_focal_loss_matches_hand_computation():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    labels = torch.tensor([1, 2])  # a positive of class 1 (IoU 0.7), then a background sample
    scores = torch.tensor([0.7, 0.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    neg = lambda x: math.log(1 + math.exp(x)) * sig(x) ** 2  # BCE against 0, scaled by p^2
    p = sig(-1.0)
    pos = -(0.7 * math.log(p) + 0.3 * math.log(1 - p)) * abs(0.7 - p) ** 2
    expected = torch.tensor([neg(0.5) + pos, neg(2.0) + neg(0.0)])
    got = quality_focal_loss(logits, labels, scores, beta=2.0)
    assert torch.allclose(got, expected, atol=1e-6)


def perfect_outputs(head: FocalHead, batch: dict, token: int) -> dict:
    """Outputs that predict every gt exactly at `token` of its image and nothing elsewhere."""
    num_imgs = len(batch["gt_cams2d"]) * N_CAMS
    h, w = PAD[0] // 16, PAD[1] // 16
    factor = torch.tensor([PAD[1], PAD[0], PAD[1], PAD[0]], dtype=torch.float32)
    cls = torch.full((num_imgs, h * w, 10), -8.0)
    boxes = torch.tensor([0.1, 0.1, 0.02, 0.02]).repeat(num_imgs, h * w, 1)
    centers = torch.full((num_imgs, h * w, 2), 0.9)
    for b, cams in enumerate(batch["gt_cams2d"]):
        for j, cam in enumerate(cams.tolist()):
            img = b * N_CAMS + cam
            cls[img, token, batch["gt_labels2d"][b][j]] = 8.0
            boxes[img, token] = xyxy_to_cxcywh(batch["gt_bboxes2d"][b][j] / factor)
            centers[img, token] = batch["gt_centers2d"][b][j] / factor[:2]
    return {
        "enc_cls_scores": cls,
        "enc_bbox_preds": boxes,
        "pred_centers2d": centers,
        "centerness": torch.zeros(num_imgs, h * w, 1),
        "topk_indexes": None,
    }


def test_assigner_picks_the_perfect_token_at_the_lowest_cost():
    head = small_head()
    first, second = (0, (20.0, 10.0, 60.0, 40.0), 3), (0, (0.0, 30.0, 30.0, 64.0), 7)
    batch = small_batch([[first, second]])
    out = perfect_outputs(head, small_batch([[first]]), token=7)
    # the second gt predicted perfectly at token 12
    factor = torch.tensor([80.0, 64.0, 80.0, 64.0])
    out["enc_cls_scores"][0, 12, 7] = 8.0
    out["enc_bbox_preds"][0, 12] = xyxy_to_cxcywh(batch["gt_bboxes2d"][0][1] / factor)
    out["pred_centers2d"][0, 12] = batch["gt_centers2d"][0][1] / factor[:2]
    args = (
        out["enc_cls_scores"][0],
        out["enc_bbox_preds"][0],
        out["pred_centers2d"][0],
        batch["gt_bboxes2d"][0],
        batch["gt_labels2d"][0],
        batch["gt_centers2d"][0],
        PAD,
    )
    assigner = HungarianAssigner2D()
    cost = assigner.cost(*args)
    assert cost.shape == (20, 2)
    assert int(cost[:, 0].argmin()) == 7 and int(cost[:, 1].argmin()) == 12
    tok, gt = assigner.assign(*args)
    assert dict(zip(gt.tolist(), tok.tolist())) == {0: 7, 1: 12}
    empty = assigner.assign(*args[:3], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), PAD)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_perfect_prediction_has_zero_regression_losses_on_the_right_image():
    head = small_head()
    # gts on camera 2 of frame 0 and camera 1 of frame 1: images 2 and 4
    batch = small_batch([[(2, (20.0, 10.0, 60.0, 40.0), 3)], [(1, (8.0, 8.0, 40.0, 56.0), 0)]])
    losses = head.loss(perfect_outputs(head, batch, token=6), batch)
    for name in ("loss_bbox2d", "loss_iou2d", "loss_centers2d"):
        assert float(losses[name]) == pytest.approx(0.0, abs=1e-5), name
    # a box on a different token than its prediction makes them positive
    shifted = perfect_outputs(head, batch, token=6)
    shifted["enc_bbox_preds"][2, 6, 0] += 0.1
    assert float(head.loss(shifted, batch)["loss_bbox2d"]) == pytest.approx(5.0 * 0.1 / 2, rel=1e-4)


def test_centerness_heatmap_peaks_at_the_centre_token():
    centers = torch.tensor([[40.0, 24.0]])  # cell x = 2, y = 1
    boxes = torch.tensor([[8.0, 0.0, 72.0, 56.0]])  # min distance to a side 24 px -> radius ceil(1.5) = 2
    heat = centerness_heatmap(centers, boxes, (4, 5), stride=16)
    assert float(heat.max()) == 1.0
    assert int(heat.flatten().argmax()) == 1 * 5 + 2
    assert float(heat[1, 2 - 2]) > 0 and float(heat[3, 2]) > 0  # radius 2 reaches two cells out
    assert int((heat == 1).sum()) == 1
    # a centre on the right edge (x = W) falls outside the map and draws nothing, as upstream
    assert float(centerness_heatmap(torch.tensor([[80.0, 24.0]]), boxes, (4, 5)).sum()) == 0.0
    assert float(centerness_heatmap(torch.zeros(0, 2), torch.zeros(0, 4), (4, 5)).sum()) == 0.0


def test_losses_finite_positive_and_gradients_reach_every_parameter():
    head = small_head().train()
    feats = torch.randn(2, N_CAMS, 32, 4, 5)
    batch = small_batch(
        [
            [(0, (10.0, 5.0, 50.0, 45.0), 0), (2, (30.0, 20.0, 78.0, 60.0), 8)],
            [(1, (0.0, 0.0, 20.0, 30.0), 5)],
        ]
    )
    losses = head.loss(head(feats, batch), batch)
    assert set(losses) == {"loss_cls2d", "loss_bbox2d", "loss_iou2d", "loss_centers2d", "loss_centerness"}
    for name, value in losses.items():
        assert torch.isfinite(value) and float(value.detach()) > 0, name
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_no_boxes_zero_regression_but_background_classification_and_centerness():
    """Upstream with no gts: every token is background, so QFL and the all-zero heatmap's focal loss
    stay positive (averaged over 1); L1, GIoU and centre losses are zero."""
    head = small_head().train()
    feats = torch.randn(1, N_CAMS, 32, 4, 5)
    batch = small_batch([[]])
    losses = head.loss(head(feats, batch), batch)
    for name in ("loss_bbox2d", "loss_iou2d", "loss_centers2d"):
        assert float(losses[name].detach()) == 0.0, name
    assert float(losses["loss_cls2d"].detach()) > 0 and float(losses["loss_centerness"].detach()) > 0
    sum(losses.values()).backward()
    assert float(head.cls.weight.grad.abs().sum()) > 0
