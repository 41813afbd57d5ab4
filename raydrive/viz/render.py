"""Pictures of key frames: the BEV view and the camera grid of each frame as PNGs, a panel of both per
frame for animated GIFs, and the choice of the fixed frames that every evaluation of a run draws.

File names: `<scene name>_<frame index>_bev.png` and `<scene name>_<frame index>_cams.png` (frame index
within the scene, two digits), `<scene name>.gif`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydrive.viz.bev import render_bev
from raydrive.viz.cameras import render_cameras
from raydrive.viz.frames import Boxes, box_frame_to_ego, ego_pose, gt_boxes, pred_boxes, to_numpy


@dataclass
class Options:
    score_thresh: float = 0.3  # predictions drawn: score at least this ...
    max_pred: int = 100  # ... and at most this many, best first
    min_shown: int = 10  # fewer reach score_thresh: the next best up to this many are drawn faint
    score_labels: int = 10  # the best this many carry their score in the BEV view
    range_m: float = 55.0  # BEV: metres from the ego to each edge
    bev_size: int = 800  # BEV: pixels per side
    cell_width: int = 480  # camera grid: pixels per image (1600 x 900 images become 480 x 270)
    panel_height: int = 564  # GIF panel: BEV and camera grid side by side at this height


def pick_frames(records: list[dict], n: int = 3) -> list[dict]:
    """The fixed frames every evaluation draws: the middle key frame (temporal models have warmed up
    there) of each of the first `n` scenes by name."""
    scenes: dict[str, list[dict]] = {}
    for rec in records:
        scenes.setdefault(rec["scene_name"], []).append(rec)
    picked = []
    for name in sorted(scenes)[:n]:
        frames = sorted(scenes[name], key=lambda r: r["timestamp"])
        picked.append(frames[len(frames) // 2])
    return picked


def scene_frames(records: list[dict], scene: str) -> list[dict]:
    """A scene's key frames in time order, by scene name or token."""
    frames = [r for r in records if scene in (r["scene_name"], r["scene_token"])]
    return sorted(frames, key=lambda r: r["timestamp"])


def frame_index(rec: dict) -> int:
    return int(rec.get("frame_idx", 0))


def stem(rec: dict) -> str:
    return f"{rec['scene_name']}_{frame_index(rec):02d}"


class Tracks:
    """Global-frame centres of each predicted instance id over the frames of one scene, handed to the
    BEV view as trails in the current frame."""

    def __init__(self, length: int = 20):
        self.length = length
        self.history: dict[int, list[np.ndarray]] = {}

    def trails(self, rec: dict) -> dict[int, np.ndarray]:
        to_ego = np.linalg.inv(ego_pose(rec))
        return {tid: (np.stack(p) @ to_ego[:3, :3].T + to_ego[:3, 3]) for tid, p in self.history.items() if p}

    def add(self, rec: dict, pred: Boxes, ids, keep: np.ndarray) -> None:
        pose = ego_pose(rec)
        ids = np.asarray(ids).reshape(-1)
        for i in keep:
            if ids[i] >= 0:
                trail = self.history.setdefault(int(ids[i]), [])
                trail.append(pose[:3, :3] @ pred.center[i] + pose[:3, 3])
                del trail[: -self.length]


@dataclass
class FramePictures:
    rec: dict
    bev: object  # PIL images
    cams: object

    def save(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{stem(self.rec)}_bev.png", out_dir / f"{stem(self.rec)}_cams.png"]
        save_png(self.bev, paths[0])
        save_png(self.cams, paths[1], colors=256)
        return paths

    def panel(self, height: int):
        """BEV and camera grid side by side, `height` pixels high."""
        from PIL import Image

        bev = self.bev.resize((height, height), Image.LANCZOS)
        cams = self.cams.resize((round(self.cams.width * height / self.cams.height), height), Image.LANCZOS)
        out = Image.new("RGB", (bev.width + cams.width, height), (255, 255, 255))
        out.paste(bev, (0, 0))
        out.paste(cams, (bev.width, 0))
        return out


def save_png(img, path: Path, colors: int | None = None) -> Path:
    """A PNG; photos (`colors`) are quantised to a palette, which keeps a camera grid near 0.5 MB."""
    from PIL import Image

    if colors:
        img = img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", compress_level=6)
    tmp.replace(path)
    return path


def render_frame(
    rec: dict,
    pred: dict | None,
    frame: str,
    dataroot: str | Path,
    tag: str = "",
    tracks: Tracks | None = None,
    opts: Options | None = None,
) -> FramePictures:
    """Both pictures of one key frame. `pred`: the model's outputs for it (boxes in its box frame
    `frame`, scores, labels, and whatever keys the BEV layers draw), or None for ground truth only."""
    opts = opts or Options()
    pred = {k: to_numpy(v) for k, v in (pred or {}).items()}
    m = box_frame_to_ego(rec, frame)
    gt = gt_boxes(rec)
    boxes = pred_boxes(pred, m) if "boxes" in pred else Boxes.empty(with_score=True)
    keep, faint = boxes.pick(opts.score_thresh, opts.max_pred, opts.min_shown)
    top = f" (best {boxes.score.max():.2f})" if len(boxes) else ""
    lines = [f"{rec['scene_name']} frame {frame_index(rec)}", tag, f"ground truth: {len(gt)} boxes"]
    lines += [f"predictions: {len(keep)} of {len(boxes)}", f"  with score >= {opts.score_thresh:g}{top}"]
    if len(faint):
        lines.append(f"  and the next best {len(faint)}, faint")
    title = "\n".join(line for line in lines if line)
    trails = tracks.trails(rec) if tracks is not None else {}
    bev = render_bev(
        gt,
        boxes,
        pred_dict=pred,
        box_to_ego=m,
        tracks=trails,
        title=title,
        range_m=opts.range_m,
        size=opts.bev_size,
        score_thresh=opts.score_thresh,
        max_pred=opts.max_pred,
        min_shown=opts.min_shown,
        score_labels=opts.score_labels,
    )
    if tracks is not None and "instance_ids" in pred:
        tracks.add(rec, boxes, pred["instance_ids"], np.concatenate([keep, faint]))
    cam_title = "   ".join(line.strip() for line in lines if line)
    cams = render_cameras(rec, dataroot, gt, boxes.take(keep), opts.cell_width, cam_title, boxes.take(faint))
    return FramePictures(rec, bev, cams)


def write_gif(frames: Iterable[FramePictures], path: Path, height: int = 564, frame_ms: int = 500) -> Path:
    """An animated GIF of the frames' BEV + camera panels, looping."""
    panels = [f.panel(height) for f in frames]
    if not panels:
        raise ValueError("no frames to animate")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    panels[0].save(tmp, format="GIF", save_all=True, append_images=panels[1:], duration=frame_ms, loop=0)
    tmp.replace(path)
    return path


def write_pictures(
    records: list[dict],
    predictions: dict[str, dict],
    frame: str,
    dataroot: str | Path,
    out_dir: Path,
    tag: str = "",
    opts: Options | None = None,
) -> list[Path]:
    """Pictures of the given frames from predictions by sample token (frames without predictions show
    ground truth only)."""
    paths = []
    for rec in records:
        pics = render_frame(rec, predictions.get(rec["token"]), frame, dataroot, tag, opts=opts)
        paths += pics.save(Path(out_dir))
    return paths
