"""Pictures: what the BEV view and the camera grid show, where, for a hand-made key frame with known
poses and calibration; the GIF of a scene; `raydrive viz` on a checkpoint; the training curves; the
evaluator hook the engine calls after an evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from raydrive.data import geometry as geo
from raydrive.data.constants import CAMERAS, CLASSES

W, H, F = 800, 450, 500.0  # image size and focal length of the hand-made cameras
CAM_YAW = {  # degrees about the ego's z: where each camera looks
    "CAM_FRONT": 0,
    "CAM_FRONT_RIGHT": -55,
    "CAM_FRONT_LEFT": 55,
    "CAM_BACK": 180,
    "CAM_BACK_LEFT": 110,
    "CAM_BACK_RIGHT": -110,
}
CAM_HEIGHT = 1.5
EGO_YAW = np.deg2rad(30.0)
EGO_T = np.array([600.0, 1200.0, 0.0])
# camera axes (x right, y down, z forward) in the ego frame of a camera looking along ego +x
CAM_TO_EGO_FRONT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _gray_jpeg(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (128, 128, 128)).save(path, quality=95)


def make_record(dataroot: Path, boxes: list[dict], token: str = "tok0", scene: str = "scene-test", idx: int = 0):
    """A key frame: the ego at EGO_T turned by EGO_YAW, a nuScenes-like lidar mount (x right, y forward),
    six pinhole cameras at CAM_HEIGHT, grey images, and annotations given in the ego frame as
    {name, x, y, yaw, lwh, v}."""
    ego_q = geo.yaw_to_quat(EGO_YAW)
    ego = geo.transform(ego_q, EGO_T)
    cams = {}
    for cam in CAMERAS:
        rot = geo.rot_z(np.deg2rad(CAM_YAW[cam])) @ CAM_TO_EGO_FRONT
        path = f"samples/{cam}/{token}.jpg"
        _gray_jpeg(dataroot / path)
        cams[cam] = {
            "data_path": path,
            "width": W,
            "height": H,
            "cam_intrinsic": np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]]),
            "sensor2ego_rotation": geo.matrix_to_quat(rot),
            "sensor2ego_translation": np.array([0.0, 0.0, CAM_HEIGHT]),
            "ego2global_rotation": ego_q,
            "ego2global_translation": EGO_T,
            "type": cam,
        }
    ann = {"ann_translation": [], "ann_size": [], "ann_rotation": [], "ann_velocity": [], "gt_names": []}
    for b in boxes:
        length, width, height = b["lwh"]
        ann["ann_translation"].append(geo.apply(ego, np.array([[b["x"], b["y"], height / 2]]))[0])
        ann["ann_size"].append([width, length, height])
        ann["ann_rotation"].append(geo.yaw_to_quat(EGO_YAW + b["yaw"]))
        v = geo.rot_z(EGO_YAW) @ np.array([*b.get("v", (0.0, 0.0)), 0.0])
        ann["ann_velocity"].append(v)
        ann["gt_names"].append(b["name"])
    rec = {
        "token": token,
        "scene_name": scene,
        "scene_token": scene,
        "frame_idx": idx,
        "timestamp": 1_000_000 * (idx + 1),
        "ego2global_rotation": ego_q,
        "ego2global_translation": EGO_T,
        "lidar2ego_rotation": geo.yaw_to_quat(-np.pi / 2),
        "lidar2ego_translation": np.array([0.94, 0.0, 1.84]),
        "cams": cams,
        "gt_names": np.array(ann.pop("gt_names"), dtype=object),
    }
    widths = {"ann_translation": 3, "ann_size": 3, "ann_rotation": 4, "ann_velocity": 3}
    rec.update({k: np.array(v, dtype=np.float64).reshape(len(boxes), widths[k]) for k, v in ann.items()})
    return rec


def as_prediction(rec: dict, boxes: list[dict], scores, frame: str = "lidar") -> dict:
    """Ego-frame boxes expressed in the model's box frame, as a model's predict would return them."""
    from raydrive.viz.frames import box_frame_to_ego

    m = np.linalg.inv(box_frame_to_ego(rec, frame))
    out = []
    for b in boxes:
        length, width, height = b["lwh"]
        c = geo.apply(m, np.array([[b["x"], b["y"], height / 2]]))[0]
        yaw = b["yaw"] + np.arctan2(m[1, 0], m[0, 0])
        v = m[:3, :3] @ np.array([*b.get("v", (0.0, 0.0)), 0.0])
        out.append([*c, length, width, height, yaw, v[0], v[1]])
    labels = [CLASSES.index(b["name"]) for b in boxes]
    return {"boxes": np.array(out), "scores": np.asarray(scores, dtype=np.float64), "labels": np.array(labels)}


def ego_to_box_frame(rec: dict, points, frame: str = "lidar") -> np.ndarray:
    from raydrive.viz.frames import box_frame_to_ego

    p = np.asarray(points, dtype=np.float64)
    p3 = np.concatenate([p, np.zeros((*p.shape[:-1], 1))], axis=-1) if p.shape[-1] == 2 else p
    return geo.apply(np.linalg.inv(box_frame_to_ego(rec, frame)), p3.reshape(-1, 3)).reshape(p3.shape)


CAR = dict(name="car", x=10.0, y=5.0, yaw=np.deg2rad(30), lwh=(4.5, 1.9, 1.6), v=(5.0, 0.0))
TRUCK = dict(name="truck", x=-15.0, y=-10.0, yaw=0.0, lwh=(8.0, 2.5, 3.0), v=(-3.0, -3.0))
RANGE, SIZE = 55.0, 800  # the BEV defaults (raydrive.viz.render.Options)


def bev_pixel(x: float, y: float) -> tuple[int, int]:
    """(row, column) of an ego-frame point in the BEV image: x forward is up, y left is left, the ego at
    the centre of the square plot on the left."""
    return int((RANGE - x) / (2 * RANGE) * SIZE), int((RANGE - y) / (2 * RANGE) * SIZE)


def rgb_of(name: str) -> np.ndarray:
    from raydrive.viz.style import CLASS_COLORS, rgb

    return np.array(rgb(CLASS_COLORS[name]), dtype=np.float64)


def near(img: np.ndarray, row: int, col: int, color, tol: float = 40.0, radius: int = 1) -> bool:
    """Some pixel within `radius` of (row, col) has `color` (Euclidean RGB distance under tol)."""
    patch = img[row - radius : row + radius + 1, col - radius : col + radius + 1].astype(np.float64)
    return bool((np.linalg.norm(patch - np.asarray(color, dtype=np.float64), axis=-1) < tol).any())


def along(box: dict, forward: float, left: float) -> tuple[float, float]:
    """An ego-frame point at (forward, left) metres in a box's own axes from its centre."""
    c, s = np.cos(box["yaw"]), np.sin(box["yaw"])
    return box["x"] + forward * c - left * s, box["y"] + forward * s + left * c


@pytest.mark.parametrize("frame", ["lidar", "mean_cam_ego"])
def test_bev_draws_ground_truth_and_predictions_where_they_are(tmp_path, frame):
    from raydrive.viz.bev import GT_ALPHA
    from raydrive.viz.render import render_frame

    rec = make_record(tmp_path, [CAR])
    pred = as_prediction(rec, [TRUCK], [0.8], frame)
    start = time.perf_counter()
    pics = render_frame(rec, pred, frame, tmp_path, tag="test")
    elapsed = time.perf_counter() - start
    bev = np.asarray(pics.bev)
    assert bev.shape[0] == SIZE and bev.shape[1] > SIZE
    white = (255, 255, 255)

    # ground truth: filled with the class colour at GT_ALPHA over white, beside the heading tick
    tint = GT_ALPHA * rgb_of("car") + (1 - GT_ALPHA) * 255
    for forward, left in ((0.0, 0.5), (1.5, -0.5), (-1.5, 0.5)):
        assert near(bev, *bev_pixel(*along(CAR, forward, left)), tint, tol=12, radius=0), (forward, left)
    # its heading tick runs from the centre to the front, in the class colour
    assert near(bev, *bev_pixel(*along(CAR, 1.6, 0.0)), rgb_of("car"), tol=60)
    assert not near(bev, *bev_pixel(*along(CAR, -1.6, 0.0)), rgb_of("car"), tol=60, radius=0)
    # the prediction: an outline (empty inside) with a heading tick, in the truck colour, where it was put
    assert near(bev, *bev_pixel(*along(TRUCK, 3.0, 0.0)), rgb_of("truck"), tol=60)
    assert near(bev, *bev_pixel(*along(TRUCK, 0.0, 0.7)), white, tol=3, radius=0)
    assert near(bev, *bev_pixel(*along(TRUCK, 1.0, 1.25)), rgb_of("truck"), tol=60, radius=2)  # left side
    # background elsewhere, the ego (black) at the centre
    for x, y in ((-30.0, 25.0), (25.0, -20.0), (-10.0, 10.0), (15.0, 5.0)):
        assert near(bev, *bev_pixel(x, y), white, tol=3, radius=0), (x, y)
    assert near(bev, *bev_pixel(1.3, 0.3), (0, 0, 0), tol=10, radius=0)
    assert elapsed < 10, elapsed  # < 3 s on an idle 2-core CI machine; generous under load


def test_camera_wireframes_land_on_the_projection_of_the_boxes(tmp_path):
    from raydrive.viz.cameras import cell_origin, render_cameras
    from raydrive.viz.frames import gt_boxes, pred_boxes
    from raydrive.viz.render import box_frame_to_ego

    gt_car = dict(CAR, x=12.0, y=2.0, yaw=0.0)
    pred_car = dict(CAR, name="bus", x=15.0, y=-4.0, yaw=0.0, lwh=(10.0, 2.5, 3.0))
    rec = make_record(tmp_path, [gt_car])
    pred = pred_boxes(as_prediction(rec, [pred_car], [0.9]), box_frame_to_ego(rec, "lidar"))
    cell_w = 480
    grid = np.asarray(render_cameras(rec, tmp_path, gt_boxes(rec), pred, cell_width=cell_w))
    scale = cell_w / W
    x0, y0 = cell_origin("CAM_FRONT", cell_w, round(H * scale))

    def front_pixel(x, y, z):  # the front camera: looks along ego x from height CAM_HEIGHT
        cam = CAM_TO_EGO_FRONT.T @ (np.array([x, y, z]) - np.array([0.0, 0.0, CAM_HEIGHT]))
        u, v = F * cam[0] / cam[2] + W / 2, F * cam[1] / cam[2] + H / 2
        return int(y0 + v * scale), int(x0 + u * scale)

    gray = (128, 128, 128)
    car = rgb_of("car")
    row, col = front_pixel(gt_car["x"], gt_car["y"], gt_car["lwh"][2] / 2)
    assert near(grid, row, col, gray, tol=12, radius=0)  # the centre itself: no edge passes through it
    # the outermost edges in that row: the vertical edges through the leftmost and rightmost projected corners
    corners = [
        front_pixel(*along(gt_car, fx * 2.25, sy * 0.95), z) for fx in (-1, 1) for sy in (-1, 1) for z in (0, 1.6)
    ]
    cols = [c for _, c in corners]
    line = np.nonzero(np.linalg.norm(grid[row, x0 : x0 + cell_w].astype(float) - car, axis=-1) < 60)[0] + x0
    assert len(line) and line.min() < col < line.max()
    assert line.min() == pytest.approx(min(cols), abs=2) and line.max() == pytest.approx(max(cols), abs=2)
    column = np.linalg.norm(grid[:, col].astype(float) - car, axis=-1) < 60
    assert column[y0:row].any() and column[row:].any(), "the top and bottom edges above and below the centre"
    # the prediction's cross on its front face meets at the projection of that face's centre
    front = along(pred_car, pred_car["lwh"][0] / 2, 0.0)
    assert near(grid, *front_pixel(*front, pred_car["lwh"][2] / 2), rgb_of("bus"), tol=60, radius=1)
    # nothing of either in the back camera's cell (below its name tag)
    bx, by = cell_origin("CAM_BACK", cell_w, round(H * scale))
    back = grid[by + 30 : by + round(H * scale), bx : bx + cell_w].astype(float)
    assert (np.abs(back - 128).max(axis=-1) < 12).all()


def test_bev_layers_draw_map_plan_and_tracks_and_take_new_keys(tmp_path):
    from PIL import Image

    from raydrive.viz.bev import BEV_LAYERS, bev_layer
    from raydrive.viz.render import Tracks, render_frame
    from raydrive.viz.style import MAP_COLORS, PLAN_COLOR, rgb

    rec = make_record(tmp_path, [])
    pred = as_prediction(rec, [TRUCK], [0.8])
    pred["map_polylines"] = [ego_to_box_frame(rec, [[20.0, -25.0], [20.0, 25.0]])]
    pred["map_labels"] = np.array([1])
    pred["ego_trajectory"] = ego_to_box_frame(rec, [[2.0 * t, 0.2 * t * t] for t in range(1, 7)])[:, :2]
    pred["instance_ids"] = np.array([7])
    calls = []

    @bev_layer("occupancy")
    def occupancy(ctx, value):
        calls.append((value, ctx.shown.tolist()))

    try:
        tracks = Tracks()
        tracks.history[7] = [
            geo.apply(geo.transform(rec["ego2global_rotation"], EGO_T), np.array([[-25.0, -10.0, 1.5]]))[0]
        ]
        pred["occupancy"] = "grid"
        bev = np.asarray(render_frame(rec, pred, "lidar", tmp_path, tracks=tracks).bev)
    finally:
        del BEV_LAYERS["occupancy"]
    assert calls == [("grid", [0])]
    assert near(bev, *bev_pixel(20.0, 10.0), rgb(MAP_COLORS[1]), tol=40)  # the map polyline
    assert near(bev, *bev_pixel(8.0, 3.2), rgb(PLAN_COLOR), tol=60, radius=2)  # the plan's 4th point
    trail = 0.7 * rgb_of("truck") + 0.3 * 255  # the track's trail, from the last centre to this frame's
    assert near(bev, *bev_pixel(-20.0, -10.0), trail, tol=40, radius=1)
    assert not near(bev, *bev_pixel(-20.0, 10.0), trail, tol=40, radius=1)
    Image.fromarray(bev).save(tmp_path / "layers.png")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints, the evaluator hook, curves.


def make_run(model: str, prepared: Path, synth_root: Path, run_dir: Path) -> Path:
    """A run folder with one checkpoint of a freshly built model (saved as the engine saves them) and a
    few TensorBoard scalars."""
    import dataclasses

    from torch.utils.tensorboard import SummaryWriter

    from raydrive.config import apply_overrides
    from raydrive.data.assets import asset_paths
    from raydrive.engine import checkpoint as ckpt
    from raydrive.trainers import get_spec

    spec = get_spec(model)
    cfg = apply_overrides(spec.config("small"), TINY[model])
    cfg.data = dataclasses.replace(cfg.data, prepared=str(prepared), dataroot=str(synth_root))
    net = spec.build_model(cfg.model, asset_paths(str(prepared), spec.assets))
    meta = {"model": model, "preset": "small", "step": 3, "epoch": 0, "config": cfg.to_dict()}
    ckpt.save(run_dir / "checkpoint_2026-01-01_00-00-00.000000", net.state_dict(), {"step": 3}, meta)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step in range(1, 4):
        writer.add_scalar("loss/total", 3.0 - step * 0.5, step)
        writer.add_scalar("train/lr", 1e-3 * step, step)
    writer.add_scalar("val/mAP", 0.1, 3)
    writer.close()
    return run_dir


@pytest.mark.parametrize("model", sorted(TINY))
def test_viz_draws_a_checkpoints_fixed_frames(model, prepared, synth_root, records, tmp_path):
    from PIL import Image

    from raydrive.cli import main
    from raydrive.viz.render import pick_frames, stem

    run = make_run(model, prepared, synth_root, tmp_path / "run")
    assert main(["viz", model, "--checkpoint", str(run), "--frames", "2"]) == 0
    out = run / "pictures" / "viz_step_3"
    expected = {f"{stem(r)}_{kind}.png" for r in pick_frames(records["val"], 2) for kind in ("bev", "cams")}
    assert expected <= {p.name for p in out.iterdir()}
    assert (out / "curves.png").is_file()
    for name in expected:
        with Image.open(out / name) as img:
            assert img.width >= 800 and img.height >= 500
        assert (out / name).stat().st_size < 1_500_000


def test_viz_scene_writes_a_gif_with_one_frame_per_key_frame(prepared, synth_root, records, tmp_path, capsys):
    from PIL import Image

    from raydrive.cli import main

    run = make_run("sparse4d", prepared, synth_root, tmp_path / "run")
    scene = sorted({r["scene_name"] for r in records["val"]})[0]
    frames = sum(r["scene_name"] == scene for r in records["val"])
    out = tmp_path / "out"
    assert main(["viz", "--checkpoint", str(run), "--scene", scene, "--out", str(out)]) == 0
    with Image.open(out / f"{scene}.gif") as gif:
        assert gif.n_frames == frames
    assert len(list(out.glob(f"{scene}_*_bev.png"))) == frames
    assert main(["viz", "bevdepth", "--checkpoint", str(run)]) == 2  # the wrong model: one line, no traceback
    assert "is a sparse4d checkpoint" in capsys.readouterr().err
    assert main(["viz", "--checkpoint", str(run), "--scene", "scene-none"]) == 2


class StubEvaluator:
    headline = ("m",)

    def __init__(self, fail: bool = False):
        self.fail, self.drawn = fail, []

    def process(self, batch, outputs):
        pass

    def state(self):
        return {"tok": 1}

    def evaluate(self, states):
        return {"m": 1.0}

    def format(self, metrics):
        return ""

    def pictures(self, states, out_dir, tag):
        if self.fail:
            raise RuntimeError("no display")
        self.drawn.append((states, out_dir, tag))
        return []


class StubPipeline:
    def eval_batches(self, rank, world):
        import torch

        yield {"seq_start": torch.tensor([True]), "token": ["tok"]}


class StubModel:
    training = False

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def reset_state(self, slots=None):
        pass

    def predict(self, batch):
        return [{}]


def test_engine_evaluation_has_the_evaluator_draw_into_the_run_folder(tmp_path, capsys):
    import contextlib

    from raydrive.engine.evaluate import evaluate

    ev = StubEvaluator()
    args = (StubModel(), ev, StubPipeline())
    assert evaluate(*args, 0, 1, contextlib.nullcontext, run_dir=tmp_path, step=5) == {"m": 1.0}
    assert ev.drawn == [([{"tok": 1}], tmp_path / "pictures" / "step_5", "step 5")]
    assert evaluate(*args, 1, 1, contextlib.nullcontext, run_dir=tmp_path, step=6) == {}  # rank 1: no pictures
    evaluate(*args, 0, 1, contextlib.nullcontext)  # no run folder (outside Ray Train): no pictures
    assert len(ev.drawn) == 1
    for _ in range(2):  # no step given: numbered in order
        evaluate(*args, 0, 1, contextlib.nullcontext, run_dir=tmp_path)
        (tmp_path / "pictures" / ev.drawn[-1][2]).mkdir(parents=True)
    assert [d[2] for d in ev.drawn[1:]] == ["eval_1", "eval_2"]
    failing = StubEvaluator(fail=True)
    assert evaluate(StubModel(), failing, StubPipeline(), 0, 1, contextlib.nullcontext, run_dir=tmp_path) == {"m": 1.0}
    assert "could not draw the pictures" in capsys.readouterr().err


def test_detection_evaluator_draws_the_fixed_frames(prepared, records, tmp_path):
    from raydrive.engine.evaluate import draw_pictures
    from raydrive.eval.detection import NuScenesDetectionEvaluator
    from raydrive.viz.render import pick_frames, stem

    picked = pick_frames(records["val"])
    ev = NuScenesDetectionEvaluator(str(prepared))
    states = [{r["token"]: {"boxes": np.zeros((0, 9)), "scores": np.zeros(0), "labels": np.zeros(0)}} for r in picked]
    paths = draw_pictures(ev, states, tmp_path, 12)
    assert sorted(p.name for p in paths) == sorted(f"{stem(r)}_{k}.png" for r in picked for k in ("bev", "cams"))
    assert all(p.parent == tmp_path / "pictures" / "step_12" for p in paths)


def test_curves_from_the_event_files_of_a_resumed_run(tmp_path, capsys):
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from raydrive.viz.curves import pictures_after_training, read_scalars

    tb = tmp_path / "run" / "tensorboard"
    first = SummaryWriter(str(tb), filename_suffix=".a")
    for step in range(1, 11):
        first.add_scalar("loss/total", 1.0, step)
        first.add_scalar("perf/samples_per_s", 4.0, step)
    first.add_scalar("val/NDS", 0.05, 0)
    first.close()
    time.sleep(1.1)  # event file names carry the second they were made in
    resumed = SummaryWriter(str(tb), purge_step=6, filename_suffix=".b")
    for step in range(6, 13):
        resumed.add_scalar("loss/total", 2.0, step)
    resumed.add_scalar("val/NDS", 0.2, 12)
    resumed.close()
    scalars = read_scalars(tb)
    steps, values = scalars["loss/total"]
    assert steps.tolist() == list(range(1, 13)) and values.tolist() == [1.0] * 5 + [2.0] * 7
    assert scalars["perf/samples_per_s"][0].tolist() == [1, 2, 3, 4, 5]  # the interrupted session's tail is gone
    assert scalars["val/NDS"][0].tolist() == [0, 12]
    path = pictures_after_training(tmp_path / "run")
    assert path == tmp_path / "run" / "pictures" / "curves.png"
    with Image.open(path) as img:
        assert img.size == (1200, 640)
        # the loss panel (top left) has the loss line's colour somewhere
        panel = np.asarray(img.convert("RGB"))[:320, :400].astype(float)
        assert (np.linalg.norm(panel - rgb_of("car"), axis=-1) < 30).any()
    assert f"pictures: {tmp_path / 'run' / 'pictures'}" in capsys.readouterr().out
    assert pictures_after_training(tmp_path / "empty") is None


def test_the_engine_imports_no_drawing():
    import subprocess
    import sys

    code = (
        "import sys; import raydrive.engine.loop, raydrive.engine.evaluate;"
        "print([m for m in sys.modules if m.startswith(('raydrive.viz', 'matplotlib'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_weak_predictions_are_drawn_faint_up_to_a_minimum():
    from raydrive.viz.frames import Boxes

    n = 6
    boxes = Boxes(np.zeros((n, 3)), np.ones((n, 3)), np.zeros(n), np.zeros((n, 2)), np.zeros(n, np.int64))
    boxes.score = np.array([0.05, 0.9, 0.2, 0.4, 0.01, 0.3])
    drawn, faint = boxes.pick(0.3, limit=100, at_least=4)
    assert drawn.tolist() == [1, 3, 5] and faint.tolist() == [2]
    drawn, faint = boxes.pick(0.3, limit=2, at_least=4)  # the limit holds for both
    assert drawn.tolist() == [1, 3] and faint.tolist() == []
    assert [x.tolist() for x in boxes.pick(0.95, limit=100, at_least=0)] == [[], []]
