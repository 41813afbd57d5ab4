"""StreamPETR's frame mapper: the image augmentation, the BEV augmentation and the 2D / 3D targets agree
with the batch's matrices; normalisation order; eval determinism; the presets' schedule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from raydrive.config import Batching, batching
from raydrive.data import geometry as geo
from raydrive.data.constants import CLASSES, NUM_CAMS
from raydrive.data.infos import CLASSES_2D
from raydrive.data.pipeline import FramePipeline, PipelineConfig, arrow_to_numpy_batch
from raydrive.models.streampetr.mapper import StreamPETRMapper, StreamPETRMapperConfig, visible
from raydrive.trainers import get_spec

UNFILTERED = dict(only_valid=False, bev_range=(-1e3, -1e3, 1e3, 1e3))


def mapper_rows(prepared, train: bool, split: str = "train", preset: str = "small", epoch: int = 0, **mapper):
    """A mapper of the preset (with `mapper` overrides) and its split's planned rows, one dict per frame."""
    cfg = get_spec("streampetr").config(preset)
    cfg.data.prepared = str(prepared)
    cfg.mapper = dataclasses.replace(cfg.mapper, **mapper)
    m = StreamPETRMapper(cfg, train)
    pipe = FramePipeline(PipelineConfig(str(prepared), split, Batching(1, 2, 1, 2)), m)
    table = pipe.rows(epoch, 0) if train else pipe.eval_rows(0, 1)
    cols = arrow_to_numpy_batch(table)
    return m, [{k: v[i] for k, v in cols.items()} for i in range(table.num_rows)]


def raw_ida(row: dict, out: dict, c: int) -> np.ndarray:
    """The image augmentation the batch applied to camera c: intrinsics @ inv(K)."""
    k4 = np.eye(4)
    k4[:3, :3] = row["cam_intrinsic"][c]
    return (out["intrinsics"][c].astype(np.float64) @ np.linalg.inv(k4))[:3, :3]


def project(lidar2img: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.concatenate([xyz, np.ones((len(xyz), 1))], 1) @ lidar2img.astype(np.float64).T
    return p[:, :2] / p[:, 2:3], p[:, 2]


def test_a_box_centre_projects_onto_its_2d_centre_after_flip_and_bev_aug(prepared):
    """Every 2D centre target inside the image is the projection, through the batch's lidar2img, of the
    (augmented) 3D box at its depth; its 2D label names the same class in the converter order."""
    m, rows = mapper_rows(prepared, train=True, **UNFILTERED)
    flips, checked, differ = set(), 0, 0
    for row in rows[:8]:
        out = m.frame(row)
        flips.add(bool(raw_ida(row, out, 0)[0, 0] < 0))
        fh, fw = out["pad_hw"]
        boxes = out["gt_boxes"].astype(np.float64)
        for cam, center, depth, label in zip(
            out["gt_cams2d"], out["gt_centers2d"], out["gt_depths2d"], out["gt_labels2d"]
        ):
            if not (0 < center[0] < fw and 0 < center[1] < fh):
                continue  # clipped to the border: no longer the projected centre
            uv, z = project(out["lidar2img"][cam], boxes[:, :3])
            j = int(np.argmin(np.abs(z - depth)))
            assert abs(z[j] - depth) < 1e-3 * depth
            assert np.abs(uv[j] - center).max() < 1.0, f"centre {center} vs projected {uv[j]}"
            assert CLASSES_2D[label] == CLASSES[out["gt_labels"][j]]
            differ += int(label != out["gt_labels"][j])
            checked += 1
    assert flips == {True, False}, "the frames checked should include flipped and unflipped ones"
    assert checked >= 20 and differ > 0


def test_2d_boxes_move_with_the_image_augmentation_like_points(prepared):
    """Without the occlusion filter the 2D targets are exactly the prepared boxes moved by the batch's
    ida (as points), clipped to the image, those at least 2 px wide and high."""
    m, rows = mapper_rows(prepared, train=True, filter_invisible=False)
    for row in rows[:6]:
        out = m.frame(row)
        fh, fw = out["pad_hw"]
        raw_cam = np.asarray(row["ann2d_cam"], dtype=np.int64)
        raw_box = np.stack(row["ann2d_bbox"])
        expected = []
        for i, c in enumerate(raw_cam):
            ida = raw_ida(row, out, c)
            pts = np.array([[raw_box[i, 0], raw_box[i, 1], 1], [raw_box[i, 2], raw_box[i, 3], 1]]) @ ida.T
            box = np.clip([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], 0, [fw, fh, fw, fh])
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                expected.append((c, row["ann2d_depth"][i], box))
        assert len(out["gt_bboxes2d"]) == len(expected)
        for c, depth, box in expected:
            j = np.flatnonzero((out["gt_cams2d"] == c) & np.isclose(out["gt_depths2d"], depth, rtol=1e-6))
            assert len(j) == 1
            np.testing.assert_allclose(out["gt_bboxes2d"][j[0]], box, atol=1e-3)


def test_occluded_2d_boxes_are_dropped_farthest_first_as_upstream():
    """A box that nearer ones cover entirely goes; the survivors come farthest first. The farthest box
    is the map's background value, so it stays even when covered (upstream `_filter_invisible`)."""
    boxes = np.array([[10, 10, 20, 20], [0, 0, 40, 40], [12, 12, 18, 18], [50, 5, 60, 15]], dtype=np.float64)
    depths = np.array([20.0, 5.0, 30.0, 10.0])
    keep = visible(boxes, depths, (64, 64))
    assert keep.tolist() == [2, 3, 1]  # box 0 (behind box 1) is gone; box 2 is covered too but farthest
    assert visible(boxes[:2], depths[:2], (64, 64)).tolist() == [0, 1]  # background 0 again
    assert visible(boxes[[1, 0]], np.array([5.0, 20.0]), (40, 40)).tolist() == [0]  # full cover, no background


def test_bev_augmentation_moves_boxes_like_the_matrix_and_keeps_global_positions(prepared):
    """Train vs eval of the same frame: the train boxes are the eval boxes under bev = ego_pose_train^-1
    @ ego_pose_eval (a z rotation within +-0.3925 rad and a scale in [0.95, 1.05]); a box centre's global
    position is the same; lidar2img sees the same pixel."""
    train, rows = mapper_rows(prepared, train=True)
    evaluation, _ = mapper_rows(prepared, train=False)
    angles = []
    for row in rows[:6]:
        a, b = train.frame(row), evaluation.frame(row)
        np.testing.assert_allclose(b["ego_pose"], geo.lidar_to_global(row), atol=1e-9)
        np.testing.assert_allclose(a["ego_pose_inv"] @ a["ego_pose"], np.eye(4), atol=1e-9)
        bev = a["ego_pose_inv"] @ b["ego_pose"]
        scale = np.cbrt(np.linalg.det(bev[:3, :3]))
        angle = math.atan2(bev[1, 0], bev[0, 0])
        assert 0.95 <= scale <= 1.05 and abs(angle) <= 0.3925 + 1e-9
        np.testing.assert_allclose(bev[:3, 3], 0, atol=1e-6)
        np.testing.assert_allclose(bev[:3, :3] / scale, geo.rot_z(angle), atol=1e-9)
        angles.append(angle)
        xa, xb = a["gt_boxes"].astype(np.float64), b["gt_boxes"].astype(np.float64)
        np.testing.assert_array_equal(a["gt_labels"], b["gt_labels"])
        np.testing.assert_allclose(xa[:, :3], geo.apply(bev, xb[:, :3]), atol=1e-3)
        np.testing.assert_allclose(geo.apply(a["ego_pose"], xa[:, :3]), geo.apply(b["ego_pose"], xb[:, :3]), atol=2e-3)
        np.testing.assert_allclose(xa[:, 3:6], xb[:, 3:6] * scale, rtol=1e-5)
        np.testing.assert_allclose(np.cos(xa[:, 6] - xb[:, 6] - angle), 1.0, atol=1e-6)
        np.testing.assert_allclose(xa[:, 7:9], xb[:, 7:9] @ bev[:2, :2].T, atol=1e-4)
        for c in range(NUM_CAMS):  # the cameras see the augmented box where they saw the original
            uv_a, z_a = project(a["lidar2img"][c], xa[:, :3])
            front = z_a > 1
            ida = raw_ida(row, a, c) @ np.linalg.inv(raw_ida(row, b, c))
            uv_b, _ = project(b["lidar2img"][c], xb[:, :3])
            uv_b = uv_b @ ida[:2, :2].T + ida[:2, 2]
            np.testing.assert_allclose(uv_a[front], uv_b[front], atol=0.05)
    assert len({round(x, 6) for x in angles}) == len(angles), "each frame draws its own BEV augmentation"


def test_3d_filters_are_upstreams_and_leave_the_2d_targets_alone(prepared):
    """Valid flag and BEV range (strict, x and y only) filter the 3D boxes; the 2D targets are the same
    with or without those filters (upstream's 2D annotations do not pass through them)."""
    filtered, rows = mapper_rows(prepared, train=False)
    every, _ = mapper_rows(prepared, train=False, **UNFILTERED)
    dropped = 0
    for row in rows:
        a, b = filtered.frame(row), every.frame(row)
        for key in ("gt_cams2d", "gt_bboxes2d", "gt_labels2d", "gt_centers2d", "gt_depths2d"):
            np.testing.assert_array_equal(a[key], b[key])
        dropped += len(b["gt_boxes"]) - len(a["gt_boxes"])
    assert dropped > 0, "the synthetic set has boxes without points"

    row = dict(rows[0])
    xy = [(51.2, 0.0), (51.19, 0.0), (0.0, -51.2), (0.0, -51.19), (3.0, 3.0), (4.0, 4.0)]
    row["gt_boxes"] = np.array([[x, y, 9.0, 4, 2, 1.5, 0.1] for x, y in xy])  # z far outside -5..3 is kept
    row["gt_velocity"] = np.array([[np.nan, np.nan]] * 6)
    row["gt_names"] = np.array(["car", "car", "bus", "bus", "animal", "trailer"], dtype=object)
    row["num_lidar_pts"], row["num_radar_pts"] = np.array([1, 1, 1, 1, 1, 0]), np.array([0, 0, 0, 1, 0, 0])
    boxes, labels = filtered.targets_3d(row, np.eye(4))
    np.testing.assert_allclose(boxes[:, :2], [[51.19, 0.0], [0.0, -51.19]], atol=1e-5)
    assert labels.tolist() == [CLASSES.index("car"), CLASSES.index("bus")]
    assert np.all(boxes[:, 7:9] == 0)  # NaN velocities become 0


def test_bgr_normalisation_is_the_rgb_one_channel_reversed(prepared):
    """VoVNet (bgr): channel 0 is blue, normalised with the blue mean 103.53 / std 57.375; r50: RGB."""
    bgr, rows = mapper_rows(prepared, train=False, bgr=True)
    rgb, _ = mapper_rows(prepared, train=False, bgr=False)
    a, b = bgr.image(rows[0], 2, _eval_aug(bgr, rows[0])), rgb.image(rows[0], 2, _eval_aug(rgb, rows[0]))
    pix_a = a * np.array([57.375, 57.12, 58.395])[:, None, None] + np.array([103.53, 116.28, 123.675])[:, None, None]
    pix_b = b * np.array([58.395, 57.12, 57.375])[:, None, None] + np.array([123.675, 116.28, 103.53])[:, None, None]
    np.testing.assert_allclose(pix_a, pix_b[::-1], atol=1e-3)
    np.testing.assert_allclose(pix_b, np.round(pix_b), atol=1e-3)  # 8-bit pixels
    assert np.abs(pix_b[0] - pix_b[2]).mean() > 1.0, "the test image should have distinct red and blue"


def _eval_aug(m: StreamPETRMapper, row: dict):
    from raydrive.data.augment import draw_image_aug

    return draw_image_aug(m.aug, int(row["cam_width"][0]), int(row["cam_height"][0]), np.random.default_rng(0))


def test_evaluation_is_deterministic_and_unaugmented(prepared):
    """Eval: the same output for any seed or epoch; test resize, centred crop from the bottom, no flip."""
    m, rows = mapper_rows(prepared, train=False)
    row = rows[1]
    a = m.frame(row)
    b = m.frame({**row, "aug_seed": np.int64(12345), "epoch": np.int64(7)})
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    fh, fw = a["pad_hw"]
    width, height = int(row["cam_width"][0]), int(row["cam_height"][0])
    s = max(fh / height, fw / width)
    new_w, new_h = int(width * s), int(height * s)
    ida = raw_ida(row, a, 0)
    np.testing.assert_allclose(ida, [[s, 0, -((new_w - fw) // 2)], [0, s, -(new_h - fh)], [0, 0, 1]], atol=1e-4)
    assert a["timestamp"] == int(row["timestamp"]) / 1e6
    train, train_rows = mapper_rows(prepared, train=True)
    x, y = train.frame(train_rows[0]), train.frame(train_rows[0])
    np.testing.assert_array_equal(x["lidar2img"], y["lidar2img"])  # seeded: a resumed run draws the same


def test_presets_keep_the_schedule_whatever_the_worker_count():
    spec = get_spec("streampetr")
    full, r50 = spec.config("full"), spec.config("r50")
    assert full.mapper.bgr and not r50.mapper.bgr
    assert tuple(full.model.image_hw) == (320, 800) and tuple(r50.model.image_hw) == (256, 704)
    assert full.optim.lr_mults == {"img_backbone": 0.1} and r50.optim.lr_mults == {"img_backbone": 0.25}
    for cfg in (full, r50):
        assert (cfg.run.global_batch, cfg.run.epochs, cfg.optim.lr, cfg.optim.loss_scale) == (16, 24, 4e-4, "dynamic")
        splits = [batching(cfg.run, w) for w in (1, 2, 4, 8)]
        assert {b.global_batch for b in splits} == {16}
        assert [b.accum_steps for b in splits] == [8, 4, 2, 1]


def test_image_rotation_is_refused_like_upstream():
    with pytest.raises(ValueError, match="rot_lim_deg"):
        StreamPETRMapperConfig(rot_lim_deg=(-5.4, 5.4))
