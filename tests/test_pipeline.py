"""The Ray Data pipeline: geometry end to end, and the lane invariants with a real Ray Train job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raydrive.config import Batching
from raydrive.data.augment import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from raydrive.data.lanes import LaneConfig
from raydrive.data.pipeline import FramePipeline, PipelineConfig


def sparse4d_mapper(prepared, image_hw, train=True, with_depth=True):
    """Sparse4D's mapper at a given image size, without photometric distortion."""
    import dataclasses

    from raydrive.models.sparse4d.mapper import Sparse4DMapper
    from raydrive.trainers import get_spec

    cfg = get_spec("sparse4d").config("small")
    cfg.data.prepared = str(prepared)
    cfg.model.image_hw = image_hw
    cfg.mapper = dataclasses.replace(cfg.mapper, photometric=False, with_depth=with_depth)
    return Sparse4DMapper(cfg, train)


def epoch_batches(pipe, epoch, rank):
    """One epoch of a worker's micro-batches."""
    return pipe.stream(rank, epoch, 0, pipe.steps_per_epoch())


def _saturation(rgb: np.ndarray) -> float:
    return float((rgb.max() - rgb.min()) / max(rgb.max(), 1e-6))


def _centre_hits(batch, final_hw, mirror: bool = False) -> tuple[int, int]:
    """(checked, on_object) over box centres within 30 m that project inside an augmented image."""
    imgs = batch["img"].numpy()  # (B, 6, 3, H, W)
    h, w = final_hw
    checked = on_object = 0
    for i in range(imgs.shape[0]):
        boxes = batch["gt_boxes"][i].numpy()
        assert boxes.shape[1] == 9
        for c in range(6):
            proj = batch["projection_mat"][i, c].numpy()
            pix = imgs[i, c].transpose(1, 2, 0) * IMAGENET_STD_RGB + IMAGENET_MEAN_RGB
            for box in boxes[np.linalg.norm(boxes[:, :2], axis=1) <= 30]:
                uvw = proj @ np.array([*box[:3], 1.0])
                if uvw[2] < 1:
                    continue
                u, v = uvw[:2] / uvw[2]
                if mirror:
                    u = w - 1 - u
                if not (1 <= u < w - 1 and 1 <= v < h - 1):
                    continue
                rgb = pix[int(v), int(u)]
                if rgb.max() < 3:
                    continue  # zero padding of crop/rotation: the centre was outside the original image
                checked += 1
                on_object += _saturation(rgb) > 0.3  # ground and sky are grey
    return checked, on_object


def test_box_centres_land_on_their_objects_in_augmented_images(prepared, ray_local):
    """Resize, crop, flip, rotation and BEV rotation are all folded into projection_mat correctly."""
    hw = (160, 440)
    cfg = PipelineConfig(prepared=str(prepared), batching=Batching(1, 2, 1, 2), lanes=LaneConfig(seed=1))
    pipe = FramePipeline(cfg, sparse4d_mapper(prepared, hw))
    checked = on_object = mirror_checked = mirror_on = 0
    for batch in epoch_batches(pipe, 0, 0):
        a, b = _centre_hits(batch, hw)
        c, d = _centre_hits(batch, hw, mirror=True)
        checked, on_object, mirror_checked, mirror_on = checked + a, on_object + b, mirror_checked + c, mirror_on + d
        depth = batch["depth"][0].numpy()
        assert depth.shape[1] == 4 and (depth[:, 3] > 0).all()
        assert (depth[:, 1] < hw[1]).all() and (depth[:, 2] < hw[0]).all()
    assert checked > 100
    assert on_object / checked > 0.97, (on_object, checked)
    assert mirror_on / mirror_checked < 0.6, (mirror_on, mirror_checked)  # control: a wrong matrix misses


def _lane_worker(config):
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = PipelineConfig(
        prepared=config["prepared"],
        batching=Batching(world, 2, 1, world * 2),
        cpus_per_task=0.5,
        lanes=LaneConfig(seed=7, seq_split_num=2),
    )
    pipe = FramePipeline(cfg, sparse4d_mapper(config["prepared"], (64, 176), with_depth=False))
    seen = []
    for epoch in (0, 1):
        for batch in epoch_batches(pipe, epoch, rank):
            seen.append(
                {
                    "epoch": epoch,
                    "step": batch["step"].tolist(),
                    "frame": batch["frame"].tolist(),
                    "token": batch["token"],
                    "seq_start": batch["seq_start"].tolist(),
                }
            )
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(seen, f)
    ray.train.report({"batches": len(seen)})


@pytest.mark.slow
def test_lane_invariants_on_two_ray_train_workers(prepared, records, ray_local, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    trainer = TorchTrainer(
        _lane_worker,
        train_loop_config={"prepared": str(prepared), "out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="lanes", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    train = records["train"]
    by_token = {r["token"]: r for r in train}
    cfg = PipelineConfig(prepared=str(prepared), batching=Batching(2, 2, 1, 4), lanes=LaneConfig(seed=7))
    pipe = FramePipeline(cfg, sparse4d_mapper(prepared, (64, 176), with_depth=False))
    lanes_by_epoch = {}
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for epoch in (0, 1):
            batches = [b for b in seen if b["epoch"] == epoch]
            plan = pipe.plan(epoch)
            # every worker received exactly its share of the plan that any process computes
            assert [f for b in batches for f in b["frame"]] == plan.rows(rank)["frame"].tolist()
            assert [b["step"][0] for b in batches] == list(range(plan.steps))
            for slot in (0, 1):
                tokens = [b["token"][slot] for b in batches]
                starts = [b["seq_start"][slot] for b in batches]
                assert starts[0]
                for prev, cur, start in zip(tokens, tokens[1:], starts[1:]):
                    if not start:  # contiguous frames of one scene, in time order
                        assert by_token[prev]["next"] == cur
                        assert by_token[cur]["timestamp"] > by_token[prev]["timestamp"]
                lanes_by_epoch.setdefault(epoch, []).append(tokens)
    assert lanes_by_epoch[0] != lanes_by_epoch[1]
    firsts = [lane[0] for lane in lanes_by_epoch[0]]
    assert len(set(firsts)) == 4  # four lanes, four different starting sequences
