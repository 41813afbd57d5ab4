"""BEVDepth: upstream state dict, geometry vs targets, targets vs decoding, the mapper's frames and
matrices, evaluation frame, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import raydrive
from raydrive.config import Batching
from raydrive.data.infos import DataError
from raydrive.data.pipeline import FramePipeline, PipelineConfig, arrow_to_numpy_batch, collate, map_block
from raydrive.models.bevdepth.config import TASKS
from raydrive.models.bevdepth.head import BEVDepthHead
from raydrive.models.bevdepth.mapper import BEVAug, bev_transform, depth_transform
from raydrive.trainers import get_spec

KEYS = Path(__file__).resolve().parent / "data" / "bevdepth_r50_2key.txt"  # copied from shared/specs/keys


def upstream_keys() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            out.append((key, tuple(int(x) for x in shape.strip("() ").split(",") if x.strip())))
    return out


def test_full_preset_is_upstream_key_for_key_and_loads_lightning_checkpoints():
    model = raydrive.build_model("bevdepth", preset="full")
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == upstream_keys()
    assert len(state) == 861
    assert sum(p.numel() for p in model.parameters()) == 76_384_590
    # a state dict with those keys loads strictly, directly and with Lightning's `model.` prefix
    other = raydrive.build_model("bevdepth", preset="full")
    other.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    other.load_state_dict({f"model.{k}": torch.zeros_like(v) for k, v in state.items()}, strict=True)
    assert float(other.head.trunk.conv1.weight.detach().abs().sum()) == 0.0
    # the stem is frozen (parameters and BN statistics), the rest trains
    assert not any(p.requires_grad for p in model.backbone.img_backbone.conv1.parameters())
    model.train()
    assert not model.backbone.img_backbone.bn1.training and model.backbone.img_backbone.layer1.training


def batch_of(prepared, train: bool, split: str = "train", preset: str = "small", frames: int = 2):
    spec = get_spec("bevdepth")
    cfg = spec.config(preset)
    cfg.data.prepared = str(prepared)
    mapper = spec.build_mapper(cfg, train)
    batching = Batching(world_size=1, batch_size=frames, accum_steps=1, global_batch=frames)
    pipe = FramePipeline(PipelineConfig(str(prepared), split, batching, offsets=(-1, 0)), mapper)
    rows = pipe.rows(epoch=0, rank=0).slice(0, frames)
    return cfg, mapper, rows, collate(map_block(arrow_to_numpy_batch(rows), mapper), mapper)


def test_a_box_centre_lifted_through_the_frustum_lands_on_its_target_peak(prepared):
    """The mapper's augmented matrices (ida, sensor2ego, bda) and its augmented boxes agree: a box
    centre seen by a camera, lifted back through the model's geometry, falls in the BEV cell where
    the head draws the box's heat-map peak."""
    cfg, _, _, batch = batch_of(prepared, train=True)
    model = raydrive.build_model("bevdepth", preset="small")
    bb = model.backbone
    boxes, labels = batch["gt_boxes"], batch["gt_labels"]
    h, w = cfg.model.bev_hw
    targets = model.head.targets([b.float() for b in boxes], list(labels), (h, w))
    checked = 0
    for i in range(len(boxes)):
        bda = batch["bda_mat"][i].double()
        for box, label in zip(boxes[i].double(), labels[i]):
            ego = torch.linalg.inv(bda) @ torch.cat([box[:3], box.new_ones(1)])
            for c in range(6):
                s2e = batch["sensor2ego_mats"][i, 0, c].double()
                k = batch["intrin_mats"][i, 0, c].double()
                cam = torch.linalg.inv(s2e) @ ego
                if cam[2] < 2.5:
                    continue
                uv = (k[:3, :3] @ cam[:3])[:2] / cam[2]
                ida = batch["ida_mats"][i, 0, c].double()
                uv_aug = ida[:2, :2] @ uv + ida[:2, 3]
                if not (0 <= uv_aug[0] < cfg.model.image_hw[1] and 0 <= uv_aug[1] < cfg.model.image_hw[0]):
                    continue
                bb.frustum = torch.tensor([[[[float(uv_aug[0]), float(uv_aug[1]), float(cam[2]), 1.0]]]])
                xyz = bb.geometry(
                    s2e.float().view(1, 1, 4, 4), k.float().view(1, 1, 4, 4), ida.float().view(1, 1, 4, 4),
                    bda.float().view(1, 4, 4),
                )  # fmt: skip
                x, y, _ = bb.cell_index(xyz).flatten().tolist()
                if not (0 <= x < w and 0 <= y < h):
                    continue
                t, offset = next((t, sum(len(n) for n in TASKS[:t])) for t in range(6) if int(label) in _ids(t))
                heat, _, ind, mask = targets[t]
                assert heat[i, int(label) - offset, y, x] == 1.0, f"box at {box[:3].tolist()}: no peak at cell {x, y}"
                assert y * w + x in ind[i][mask[i].bool()].tolist()
                checked += 1
                break
    assert checked >= 5, f"only {checked} boxes were visible and in range"


def _ids(task: int) -> list[int]:
    start = sum(len(n) for n in TASKS[:task])
    return list(range(start, start + len(TASKS[task])))


def test_perfect_head_outputs_decode_to_the_targets(prepared):
    """Targets -> the head outputs they ask for -> decoding returns the boxes (circle NMS included)."""
    cfg, _, _, batch = batch_of(prepared, train=True)
    head = BEVDepthHead(cfg.model)
    h, w = cfg.model.bev_hw
    boxes = [b.double() for b in batch["gt_boxes"]]
    targets = head.targets(boxes, list(batch["gt_labels"]), (h, w))
    preds, expected = [], [[] for _ in boxes]
    for t, (heat, anno, ind, mask) in enumerate(targets):
        b = heat.shape[0]
        maps = {n: torch.zeros(b, c, h, w, dtype=torch.float64) for n, c in [("reg", 2), ("height", 1), ("dim", 3)]}
        maps.update({n: torch.zeros(b, 2, h, w, dtype=torch.float64) for n in ("rot", "vel")})
        maps["heatmap"] = torch.where(heat == 1, 10.0, -10.0).double()
        for i in range(b):
            for k in torch.nonzero(mask[i]).flatten().tolist():
                y, x = divmod(int(ind[i, k]), w)
                vals = anno[i, k].double()
                for name, sl in [("reg", slice(0, 2)), ("height", slice(2, 3)), ("dim", slice(3, 6))]:
                    maps[name][i, :, y, x] = vals[sl]
                maps["rot"][i, :, y, x] = vals[6:8]
                maps["vel"][i, :, y, x] = vals[8:10]
                expected[i].append((t, x, y))
        preds.append(maps)
    out = head.decode(preds)
    for i, o in enumerate(out):
        got = o["boxes"]
        assert len(got) == len(set(expected[i])) > 0
        for box, label in zip(boxes[i], batch["gt_labels"][i]):
            d = (got[:, :2] - box[:2]).norm(dim=1)
            j = int(d.argmin())
            if d[j] > 1e-3:  # shares its peak cell with another box of its task, or out of range
                continue
            assert o["labels"][j] == label
            assert got[j, 2:6].tolist() == pytest.approx(box[2:6].tolist(), abs=1e-4)
            assert math.cos(got[j, 6] - box[6]) == pytest.approx(1.0, abs=1e-6)
            assert got[j, 7:9].tolist() == pytest.approx(box[7:9].tolist(), abs=1e-4)


def test_previous_key_frame_is_the_scene_predecessor_or_the_frame_itself(prepared, records):
    spec = get_spec("bevdepth")
    cfg = spec.config("small")
    cfg.data.prepared = str(prepared)
    pipe = FramePipeline(PipelineConfig(str(prepared), "train", offsets=(-1, 0)), spec.build_mapper(cfg, True))
    rows = pipe.rows(epoch=0, rank=0).to_pydict()
    prev = {r["token"]: r["prev"] for r in records["train"]}
    starts = 0
    for token, before in zip(rows["token"], rows["token@-1"]):
        if prev[token] == "":  # a scene start reuses the current frame, as upstream
            assert before == token
            starts += 1
        else:
            assert before == prev[token]
    assert 0 < starts < len(rows["token"])


def test_depth_labels_move_with_the_image_augmentation():
    """`depth_transform` puts a lidar point on the pixel where the ida matrix (the one the model
    inverts) sends it: resize, crop, flip and rotation."""
    from raydrive.data.augment import ImageAug, ida_matrix

    rng = np.random.default_rng(0)
    uvd = np.stack([rng.uniform(0, 1600, 500), rng.uniform(0, 900, 500), rng.uniform(2, 50, 500)], 1)
    for flip, rot in [(False, 0.0), (True, 0.0), (False, 4.0), (True, -5.0)]:
        aug = ImageAug((0.5, 0.5), (800, 450), (30, 194, 734, 450), flip, rot)
        dmap = depth_transform(uvd.astype(np.float32), aug, (256, 704))
        m = ida_matrix(aug)
        uv = uvd[:, :2] @ m[:2, :2].T + m[:2, 2]
        inside = (uv[:, 0] >= 1) & (uv[:, 0] < 703) & (uv[:, 1] >= 1) & (uv[:, 1] < 255)
        clear = inside & (np.abs(uv - np.round(uv)) > 1e-3).all(1)  # away from pixel edges
        assert clear.sum() > 50
        assert all(dmap[int(v), int(u)] > 0 for u, v in uv[clear])
        loose = (uv[:, 0] > -1) & (uv[:, 0] < 704) & (uv[:, 1] > -1) & (uv[:, 1] < 256)  # int() truncates
        assert (dmap > 0).sum() <= loose.sum()


def test_bev_augmentation_moves_boxes_like_the_matrix_moves_points():
    rng = np.random.default_rng(1)
    boxes = np.concatenate([rng.uniform(-40, 40, (20, 3)), rng.uniform(1, 5, (20, 3)), rng.uniform(-3, 3, (20, 3))], 1)
    for fx, fy in [(False, False), (True, False), (False, True), (True, True)]:
        aug = BEVAug(0.3, 1.04, fx, fy)
        out = bev_transform(boxes, aug)
        m = aug.matrix()[:3, :3]
        assert np.allclose(out[:, :3], boxes[:, :3] @ m.T)
        # the heading vector turns with the matrix (the yaw rule pi - yaw / -yaw is the flip of it)
        head = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), 0 * boxes[:, 6]], 1) @ m.T
        assert np.allclose(np.cos(out[:, 6]), head[:, 0] / np.linalg.norm(head, axis=1))
        assert np.allclose(np.sin(out[:, 6]), head[:, 1] / np.linalg.norm(head, axis=1))
        assert np.allclose(out[:, 3:6], boxes[:, 3:6] * 1.04)


def test_boxes_in_the_mean_camera_ego_frame_score_perfectly(prepared, synth_root, records):
    """Ground truth turned into predictions in BEVDepth's box frame scores mAP 1 through the real
    devkit: the mapper's frame and the evaluator's are the same."""
    from raydrive.eval.detection import NuScenesDetectionEvaluator

    _, mapper, rows, _ = batch_of(prepared, train=False, split="val", frames=1)
    table = FramePipeline(PipelineConfig(str(prepared), "val", offsets=(-1, 0)), mapper).eval_rows(0, 1)
    batch = arrow_to_numpy_batch(table)
    ev = NuScenesDetectionEvaluator(str(prepared), str(synth_root), frame="mean_cam_ego")
    for i in range(len(batch["token"])):
        row = {k: v[i] for k, v in batch.items()}
        mapper.cfg.only_valid = True
        boxes, labels = mapper.targets(row)
        ev.predictions[str(row["token"])] = {"boxes": boxes, "scores": np.ones(len(boxes)), "labels": labels}
    metrics = ev.evaluate([ev.state()])
    assert metrics["mAP"] > 0.99 and metrics["mATE"] < 1e-3 and metrics["mAOE"] < 1e-3


def test_missing_depth_file_names_the_file_and_the_fix(prepared, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    victim = sorted((copy / "depth_gt").iterdir())
    for f in victim:
        f.unlink()
    with pytest.raises(DataError, match=r"missing depth file .*depth_gt.*raydrive prepare.*with_depth=false"):
        batch_of(copy, train=True)


def test_a_camera_without_depth_points_has_no_depth_loss_from_it():
    """Empty depth files are valid (a camera that sees no lidar point): its patches are background and
    the depth loss averages over the patches that have a point (0 if none has)."""
    model = raydrive.build_model("bevdepth", preset="small")
    bins = model.backbone.depth_channels
    depth = torch.full((6, bins, 8, 22), 1.0 / bins)
    labels = torch.zeros(1, 6, 128, 352)
    assert float(model.depth_loss(labels, depth)) == 0.0
    labels[0, 2, 5, 5] = 10.0  # one point in camera 2
    loss = float(model.depth_loss(labels, depth))
    assert loss == pytest.approx(3.0 * (-math.log(1 / bins) - (bins - 1) * math.log(1 - 1 / bins)), rel=1e-5)
