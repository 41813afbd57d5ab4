"""SparseDrive map head: upstream keys, permutation targets, loss, decode, temporal state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import upstream_keys
from shapely.geometry import LineString

from raydrive.models.sparsedrive.map_head import MapHead, MapHeadConfig, PolylineProjection
from raydrive.models.sparsedrive.map_target import map_targets, resample_line

PREFIX = "head.map_head."


def upstream_map_keys(stage: int) -> dict[str, tuple[int, ...]]:
    return upstream_keys(f"sparsedrive_small_stage{stage}.txt", PREFIX)


def small_cfg(**kw) -> MapHeadConfig:
    base = dict(
        embed_dims=32,
        num_anchor=8,
        num_groups=4,
        num_decoder=3,
        num_cams=2,
        num_levels=2,
        num_learnable_pts=1,
        fix_height=(0.0, 1.0),
        dropout=0.0,
        attn_drop=0.0,
    )
    return MapHeadConfig(**{**base, **kw})


def inputs(cfg: MapHeadConfig, bs: int = 1, t: float = 0.0, seed: int = 0, ego=None):
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(bs, cfg.num_cams, cfg.embed_dims, 8 // 2**i, 16 // 2**i, generator=g) for i in range(cfg.num_levels)
    ]
    w, h = 160.0, 80.0
    proj = torch.zeros(bs, cfg.num_cams, 4, 4)
    proj[..., 0, 0], proj[..., 0, 3] = w / 30, w / 2  # the ROI (30 m x 60 m) fills the image
    proj[..., 1, 1], proj[..., 1, 3] = h / 60, h / 2
    proj[..., 2, 3] = proj[..., 3, 3] = 1.0
    T = torch.eye(4, dtype=torch.float64).repeat(bs, 1, 1) if ego is None else ego.repeat(bs, 1, 1)
    metas = {
        "projection_mat": proj,
        "image_wh": torch.tensor([w, h]).repeat(bs, cfg.num_cams, 1),
        "timestamp": torch.full((bs,), t, dtype=torch.float64),
        "T_global": T,
        "T_global_inv": torch.linalg.inv(T),
    }
    return feats, metas


def anchors(cfg: MapHeadConfig, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.uniform([-10, -20], [10, 20], size=(cfg.num_anchor, 1, 2))
    y = np.linspace(-4, 4, cfg.num_sample)
    return (centre + np.stack([np.zeros_like(y), y], -1)).astype(np.float32)  # (K, 20, 2) like the k-means file


@pytest.mark.parametrize("stage,temp", [(1, 0), (2, 33)])
def test_state_dict_matches_upstream_keys_and_shapes(stage, temp):
    expected = upstream_map_keys(stage)
    assert len(expected) == 360
    head = MapHead(MapHeadConfig(num_temp_instances=temp))
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == expected
    assert head.instance_bank.instance_feature.requires_grad  # upstream feat_grad=True
    assert head.layers[2].kps_generator.num_pts == 300


def test_resample_matches_shapely_interpolate():
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 0.0], [3.0, 4.0], [-1.0, 7.0]])
    line = LineString(pts)
    expected = np.array([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, 20)])
    np.testing.assert_allclose(resample_line(pts), expected, atol=1e-9)


def test_map_targets_permutations_closed_and_open():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], dtype=np.float64)
    open_line = np.array([[1.0, -5.0], [1.0, 14.0]])
    labels, lines = map_targets({0: [square], 1: [open_line], 2: []})
    assert labels.tolist() == [0, 1]
    assert lines.shape == (2, 38, 20, 2) and lines.dtype == torch.float32
    sq = lines[0]
    np.testing.assert_allclose(sq[0].numpy(), resample_line(square), atol=1e-5)  # first = the line itself
    assert torch.allclose(sq[:, 0], sq[:, -1])  # every version stays closed
    # 19 distinct start points forward and 19 backward, all the same point set
    assert len({tuple(np.round(v.numpy(), 4).ravel()) for v in sq}) == 38
    assert any(torch.allclose(v, sq[0].flip(0), atol=1e-5) for v in sq)  # the reversal is there
    for v in sq:
        assert sorted(map(tuple, np.round(v[:-1].numpy(), 4))) == sorted(map(tuple, np.round(sq[0, :-1].numpy(), 4)))
    ol = lines[1]
    np.testing.assert_allclose(ol[0, :, 1].numpy(), np.linspace(-5, 14, 20), atol=1e-5)
    assert torch.equal(ol[1], ol[0].flip(0))
    assert torch.all(ol[2:] == 1e5)
    empty_labels, empty_lines = map_targets({0: [], 1: [], 2: []})
    assert empty_labels.shape == (0,) and empty_lines.shape == (0, 38, 20, 2)


def test_forward_shapes_and_decode():
    torch.manual_seed(0)
    cfg = small_cfg()
    head = MapHead(cfg, anchors(cfg)).eval()
    feats, metas = inputs(cfg, bs=2)
    out = head(feats, metas)
    assert len(out["classification"]) == len(out["prediction"]) == cfg.num_decoder
    assert out["classification"][-1].shape == (2, 8, 3)
    assert out["prediction"][-1].shape == (2, 8, 40)
    assert out["instance_feature"].shape == out["anchor_embed"].shape == (2, 8, 32)
    torch.testing.assert_close(out["anchor_embed"], head.anchor_encoder(out["prediction"][-1]))
    res = head.decode(out)
    assert len(res) == 2 and res[0]["vectors"].shape == (8, 20, 2)
    assert res[0]["scores"].shape == res[0]["labels"].shape == (8,)
    assert torch.all(res[0]["scores"][:-1] >= res[0]["scores"][1:])
    # the top pair is the best (query, class) over all classes
    cls = out["classification"][-1][0].sigmoid()
    q, c = divmod(int(cls.flatten().argmax()), 3)
    assert int(res[0]["labels"][0]) == c
    torch.testing.assert_close(res[0]["vectors"][0], out["prediction"][-1][0, q].reshape(20, 2))
    thr = float(res[1]["scores"][3])
    assert len(head.decode(out, score_threshold=thr)[1]["scores"]) == 4


def test_upstream_size_forward_runs():
    """Upstream's sizes (100 queries, 300 key points, 256 channels, 33 cached) but one camera and level."""
    torch.manual_seed(0)
    cfg = MapHeadConfig(num_temp_instances=33, num_cams=1, num_levels=1)
    head = MapHead(cfg, anchors(cfg)).eval()
    feats, metas = inputs(cfg)
    with torch.no_grad():
        out = head(feats, metas)
        out = head(feats, {**metas, "timestamp": metas["timestamp"] + 0.5})  # with 33 cached instances
    assert out["prediction"][-1].shape == (1, 100, 40) and out["classification"][0].shape == (1, 100, 3)
    assert torch.isfinite(out["prediction"][-1]).all()


def _gt():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], dtype=np.float64) + [-2.0, 5.0]
    labels, lines = map_targets({0: [square], 1: [np.array([[3.0, -20.0], [3.0, 10.0]])], 2: []})
    return [labels], [lines]


def test_loss_line_part_is_zero_for_exact_predictions_in_any_order():
    cfg = small_cfg()
    head = MapHead(cfg, anchors(cfg))
    labels, lines = _gt()
    pred = torch.full((1, 8, 40), 50.0)  # unmatched queries: far away
    pred[0, 0] = lines[0][0, 5].flatten()  # the square from another start point
    pred[0, 3] = lines[0][1, 1].flatten()  # the open line reversed
    cls = torch.full((1, 8, 3), -8.0)
    cls[0, 0, 0] = cls[0, 3, 1] = 8.0
    losses = head.loss({"classification": [cls], "prediction": [pred]}, labels, lines)
    assert set(losses) == {"loss_map_cls_0", "loss_map_line_0"}
    assert losses["loss_map_line_0"] < 1e-6
    assert losses["loss_map_cls_0"] < 1e-3
    shifted = pred.clone()
    shifted[0, 3] += 1.0
    assert head.loss({"classification": [cls], "prediction": [shifted]}, labels, lines)["loss_map_line_0"] > 0.1


def test_loss_decreases_with_training_on_one_example():
    torch.manual_seed(0)
    # every query regresses (upstream only those above 0.05, which makes the sum jump as they cross it)
    cfg = small_cfg(cls_threshold_to_reg=0.0)
    head = MapHead(cfg, anchors(cfg)).train()
    feats, metas = inputs(cfg)
    labels, lines = _gt()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    totals = []
    for _ in range(8):
        head.reset()
        losses = head.loss(head(feats, metas), labels, lines)
        assert set(losses) == {f"loss_map_{n}_{k}" for n in ("cls", "line") for k in range(cfg.num_decoder)}
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert head.instance_bank.instance_feature.grad is not None
    assert totals[-1] < 0.7 * totals[0], totals


def test_temporal_state_round_trip_and_ego_projection():
    torch.manual_seed(0)
    cfg = small_cfg(num_temp_instances=3)
    head = MapHead(cfg, anchors(cfg)).eval()
    feats, metas = inputs(cfg)
    with torch.no_grad():
        head(feats, metas)
        state = head.state()
        assert state["anchor"].shape == (1, 3, 40) and state["feature"].shape == (1, 3, 32)
        feats2, metas2 = inputs(cfg, t=0.5, seed=1)
        first = head(feats2, metas2)
        head.load_state(state)
        again = head(feats2, metas2)
        head.reset()
        fresh = head(feats2, metas2)
    for a, b in zip(first["prediction"] + first["classification"], again["prediction"] + again["classification"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(first["prediction"][-1], fresh["prediction"][-1])  # the cache mattered

    # a cached polyline moves with the ego: 90 degrees left and 2 m forward
    prev = torch.eye(4, dtype=torch.float64)
    cur = torch.tensor([[0, -1, 0, 0], [1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    line = torch.tensor([[[1.0, 0.0, 1.0, 5.0]]])
    moved = PolylineProjection().anchor_projection(line, (torch.linalg.inv(cur) @ prev)[None])
    back = (cur[:2, :2].float() @ moved.reshape(2, 2).T).T + cur[:2, 3].float()
    torch.testing.assert_close(back, line.reshape(2, 2))


def test_stage1_keeps_no_temporal_state():
    cfg = small_cfg(num_temp_instances=0)
    head = MapHead(cfg).eval()
    feats, metas = inputs(cfg)
    with torch.no_grad():
        a = head(feats, metas)
        b = head(feats, {**metas, "timestamp": metas["timestamp"] + 0.5})
    assert "anchor" not in head.state()
    torch.testing.assert_close(a["prediction"][-1], b["prediction"][-1])
