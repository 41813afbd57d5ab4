"""A small synthetic nuScenes tree in the real `v1.0-mini` format.

It is raydrive's embedded default (a first run on a laptop) and the fixture of every test. The tree
loads with the real `nuscenes.nuscenes.NuScenes`: all 13 tables, the devkit's mini split scene names,
key frames of 6 cameras + LIDAR_TOP with real files, prev/next links, a map PNG, moving objects.

It is meant to be *learnable*: every object is a solid box drawn into each camera with the true
camera geometry (class-dependent colour, shaded faces, a darker front face that shows the heading),
lidar points are ray-cast onto the object surfaces and the ground, and `num_lidar_pts` counts the
points that hit each box. Cameras fire a few ms after the lidar, each with its own ego pose, so the
lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera chain matters as in the real data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from raydrive.data import geometry as geo
from raydrive.data import synth_map
from raydrive.data.constants import (
    ATTRIBUTES,
    CAMERAS,
    CLASS_TO_CATEGORY,
    CLASSES,
    LIDAR,
    VISIBILITY_LEVELS,
    attribute_for,
    split_scene_names,
)

# Mean (w, l, h) per class, metres, close to the nuScenes statistics.
CLASS_SIZE_WLH: dict[str, tuple[float, float, float]] = {
    "car": (1.95, 4.6, 1.73),
    "truck": (2.5, 6.9, 2.8),
    "construction_vehicle": (2.8, 6.4, 3.2),
    "bus": (2.95, 11.0, 3.5),
    "trailer": (2.9, 12.3, 3.9),
    "barrier": (2.5, 0.5, 0.98),
    "motorcycle": (0.77, 2.1, 1.47),
    "bicycle": (0.6, 1.7, 1.3),
    "pedestrian": (0.67, 0.73, 1.77),
    "traffic_cone": (0.41, 0.41, 1.07),
}
# Saturated colours; the background (grey ground, pale sky) is nearly unsaturated.
CLASS_COLOR: dict[str, tuple[int, int, int]] = {
    "car": (215, 35, 35),
    "truck": (35, 80, 215),
    "construction_vehicle": (235, 200, 15),
    "bus": (225, 140, 25),
    "trailer": (135, 55, 200),
    "barrier": (20, 195, 195),
    "motorcycle": (200, 30, 160),
    "bicycle": (30, 175, 60),
    "pedestrian": (245, 150, 110),
    "traffic_cone": (255, 70, 0),
}
# (min, max) speed in m/s when the object moves; classes missing here never move.
CLASS_SPEED: dict[str, tuple[float, float]] = {
    "car": (3.0, 9.0),
    "truck": (3.0, 7.0),
    "bus": (3.0, 6.0),
    "motorcycle": (3.0, 8.0),
    "bicycle": (1.5, 4.5),
    "pedestrian": (0.9, 1.7),
}
CLASS_WEIGHT: dict[str, float] = {
    "car": 6,
    "truck": 2,
    "construction_vehicle": 1,
    "bus": 1,
    "trailer": 1,
    "barrier": 2,
    "motorcycle": 1,
    "bicycle": 1,
    "pedestrian": 3,
    "traffic_cone": 2,
}

# Camera rigs: yaw of the optical axis in the ego frame (deg), mount position, focal length at 1600 px.
CAMERA_RIG: dict[str, tuple[float, tuple[float, float, float], float]] = {
    "CAM_FRONT": (0.0, (1.70, 0.00, 1.51), 1266.0),
    "CAM_FRONT_RIGHT": (-55.0, (1.55, -0.49, 1.50), 1260.0),
    "CAM_FRONT_LEFT": (55.0, (1.52, 0.49, 1.51), 1257.0),
    "CAM_BACK": (180.0, (0.03, 0.00, 1.57), 809.0),
    "CAM_BACK_LEFT": (110.0, (1.04, 0.48, 1.56), 1256.0),
    "CAM_BACK_RIGHT": (-110.0, (1.03, -0.48, 1.56), 1259.0),
}
# Camera shutter offsets after the lidar key frame, microseconds (the real rig fires as the lidar turns).
CAMERA_DELAY_US: dict[str, int] = {
    "CAM_FRONT": 12_000,
    "CAM_FRONT_RIGHT": 20_000,
    "CAM_FRONT_LEFT": 4_000,
    "CAM_BACK": 37_000,
    "CAM_BACK_LEFT": 29_000,
    "CAM_BACK_RIGHT": 45_000,
}
LIDAR_MOUNT = (0.94, 0.0, 1.84)
LIDAR_YAW = -math.pi / 2  # like nuScenes: lidar x points to the ego's right
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E
LIDAR_RANGE = 70.0
SAMPLE_PERIOD_US = 500_000  # 2 Hz key frames
ANNOTATION_RANGE = 65.0
LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])


@dataclass
class SynthConfig:
    """What `raydrive synth` makes. The defaults give the embedded default set."""

    out: str
    scenes: int = 10
    samples_per_scene: int = 10
    seed: int = 0
    image_width: int = 1600
    image_height: int = 900
    objects_per_scene: int = 28
    lidar_azimuths: int = 1024
    jpeg_quality: int = 90
    version: str = "v1.0-mini"
    show_progress: bool = True
    val_scenes: int | None = None  # default: about a fifth, at least one

    def __post_init__(self):
        if self.version != "v1.0-mini":
            raise ValueError("the synthetic set is written as v1.0-mini only")
        if self.scenes < 2:
            raise ValueError(f"--scenes must be >= 2 so that mini_train and mini_val both exist, got {self.scenes}")
        if self.samples_per_scene < 2:
            raise ValueError(f"--samples-per-scene must be >= 2, got {self.samples_per_scene}")
        if self.image_width < 64 or self.image_height < 36:
            raise ValueError(f"image size {self.image_width}x{self.image_height} is too small (min 64x36)")


def _token(*parts) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


@dataclass
class _Object:
    cls: str
    wlh: np.ndarray  # nuScenes order: width, length, height
    start: np.ndarray  # global xy at the scene's first timestamp
    yaw: float
    speed: float
    token: str
    samples: list = field(default_factory=list)

    def xy(self, t_s: float) -> np.ndarray:
        return self.start + self.speed * t_s * np.array([math.cos(self.yaw), math.sin(self.yaw)])

    def center(self, t_s: float) -> np.ndarray:
        return np.array([*self.xy(t_s), self.wlh[2] / 2])

    @property
    def lwh(self) -> np.ndarray:
        return np.array([self.wlh[1], self.wlh[0], self.wlh[2]])


class _Scene:
    """One scene's world: an ego that drives a constant-turn path and objects that move straight."""

    def __init__(self, rng: np.random.Generator, index: int, n_samples: int, n_objects: int):
        self.index = index
        self.t0_us = 1_533_151_600_000_000 + index * 100_000_000
        self.n_samples = n_samples
        self.ego_start = np.array([400.0 + 250.0 * index, 900.0 + rng.uniform(-50, 50)])
        self.ego_yaw0 = rng.uniform(-math.pi, math.pi)
        self.ego_speed = rng.uniform(3.0, 7.0)
        self.ego_yaw_rate = rng.uniform(-0.06, 0.06)
        self.objects: list[_Object] = []
        self._place_objects(rng, n_objects)

    def ego(self, t_s: float) -> tuple[np.ndarray, float]:
        """Global (x, y, 0) and yaw of the ego at `t_s` seconds after the scene starts."""
        w, v, h0 = self.ego_yaw_rate, self.ego_speed, self.ego_yaw0
        if abs(w) < 1e-9:
            dx, dy = v * t_s * math.cos(h0), v * t_s * math.sin(h0)
        else:
            dx = v / w * (math.sin(h0 + w * t_s) - math.sin(h0))
            dy = -v / w * (math.cos(h0 + w * t_s) - math.cos(h0))
        return np.array([self.ego_start[0] + dx, self.ego_start[1] + dy, 0.0]), h0 + w * t_s

    def ego_matrix(self, t_s: float) -> np.ndarray:
        xyz, yaw = self.ego(t_s)
        return geo.transform(geo.rot_z(yaw), xyz)

    def _place_objects(self, rng, n_objects):
        classes = list(CLASSES)  # every class at least once per scene
        weights = np.array([CLASS_WEIGHT[c] for c in CLASSES], dtype=float)
        while len(classes) < n_objects:
            classes.append(CLASSES[rng.choice(len(CLASSES), p=weights / weights.sum())])
        times = np.arange(self.n_samples) * SAMPLE_PERIOD_US / 1e6
        ego_xy = np.array([self.ego(t)[0][:2] for t in times])
        for i, cls in enumerate(classes):
            for _attempt in range(200):
                obj = self._random_object(rng, cls, i, times)
                path = np.array([obj.xy(t) for t in times])
                radius = 0.5 * float(np.hypot(obj.wlh[0], obj.wlh[1]))
                if np.min(np.linalg.norm(path - ego_xy, axis=1)) < radius + 3.0:
                    continue  # keep the ego's lane free
                clear = all(
                    np.min(np.linalg.norm(path - np.array([o.xy(t) for t in times]), axis=1))
                    > radius + 0.5 * float(np.hypot(o.wlh[0], o.wlh[1])) + 0.5
                    for o in self.objects
                )
                if clear:
                    self.objects.append(obj)
                    break

    def _random_object(self, rng, cls, i, times) -> _Object:
        k = rng.integers(len(times))
        ego_xyz, ego_yaw = self.ego(times[k])
        near = i < len(CLASSES)  # one object of each class close by, so every class is seen in every scene
        fwd = rng.uniform(-18, 18) if near else rng.uniform(-32, 32)
        side = rng.choice([-1, 1]) * (rng.uniform(3.5, 12.0) if near else rng.uniform(3.5, 22.0))
        c, s = math.cos(ego_yaw), math.sin(ego_yaw)
        anchor = ego_xyz[:2] + fwd * np.array([c, s]) + side * np.array([-s, c])
        wlh = np.array(CLASS_SIZE_WLH[cls]) * rng.uniform(0.9, 1.1, size=3)
        moving = cls in CLASS_SPEED and rng.uniform() < 0.5
        speed = rng.uniform(*CLASS_SPEED[cls]) if moving else 0.0
        if cls in ("pedestrian", "traffic_cone"):
            yaw = rng.uniform(-math.pi, math.pi)
        else:  # vehicles roughly follow (or oppose) the road direction
            yaw = ego_yaw + (math.pi if rng.uniform() < 0.3 else 0.0) + rng.normal(0, 0.15)
        yaw = math.atan2(math.sin(yaw), math.cos(yaw))
        start = anchor - speed * times[k] * np.array([math.cos(yaw), math.sin(yaw)])
        return _Object(cls, wlh, start, yaw, speed, token=_token("instance", self.index, i))


def _camera_to_ego(cam: str, yaw_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    yaw_deg, pos, _ = CAMERA_RIG[cam]
    psi = math.radians(yaw_deg) + yaw_jitter
    z_axis = np.array([math.cos(psi), math.sin(psi), 0.0])  # optical axis
    x_axis = np.array([math.sin(psi), -math.cos(psi), 0.0])  # image right
    y_axis = np.array([0.0, 0.0, -1.0])  # image down
    return np.stack([x_axis, y_axis, z_axis], axis=1), np.array(pos)


def _intrinsic(cam: str, width: int, height: int) -> np.ndarray:
    f = CAMERA_RIG[cam][2] * width / 1600.0
    return np.array([[f, 0.0, width * 0.51], [0.0, f, height * 0.545], [0.0, 0.0, 1.0]])


def _background(k: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pale sky above the horizon, a grey ground that darkens towards the horizon."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    horizon = int(round(k[1, 2]))
    rows = np.arange(height)
    t = np.clip((rows - horizon) / max(1, height - horizon), 0, 1)
    ground = (95 + 45 * t)[:, None] * np.array([1.0, 1.0, 1.02])[None]
    sky = np.array([178.0, 190.0, 204.0])
    col = np.where((rows < horizon)[:, None], sky[None], ground)
    img[:] = col[:, None, :].astype(np.uint8)
    return img


def _clip_near(poly: np.ndarray, near: float = 0.1) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon against the plane z = near."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= near, b[2] >= near
        if ina:
            out.append(a)
        if ina != inb:
            t = (near - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


# Faces of `geometry.box_corners` (outward normals), and which one is the front (+length axis).
_FACES = ((0, 3, 7, 4), (1, 0, 4, 5), (2, 1, 5, 6), (3, 2, 6, 7), (4, 7, 6, 5), (0, 1, 2, 3))
_FRONT_FACE = 0


def render_camera(
    background: np.ndarray, k: np.ndarray, world2cam: np.ndarray, boxes: list[tuple[str, np.ndarray, np.ndarray, float]]
) -> Image.Image:
    """Draw solid shaded boxes (class, centre, lwh, yaw in the world frame) into one camera image."""
    img = Image.fromarray(background.copy())
    draw = ImageDraw.Draw(img)
    cam_origin = -world2cam[:3, :3].T @ world2cam[:3, 3]
    order = sorted(range(len(boxes)), key=lambda j: -np.linalg.norm(boxes[j][1] - cam_origin))
    for j in order:
        cls, center, lwh, yaw = boxes[j]
        corners = geo.box_corners(center, lwh, yaw)[0]
        cam_pts = geo.apply(world2cam, corners)
        if np.all(cam_pts[:, 2] < 0.1) or np.linalg.norm(center - cam_origin) > 90:
            continue
        base = np.array(CLASS_COLOR[cls], dtype=float)
        for f, face in enumerate(_FACES):
            world_face = corners[list(face)]
            normal = np.cross(world_face[3] - world_face[0], world_face[1] - world_face[0])  # outward
            normal /= np.linalg.norm(normal)
            if np.dot(normal, world_face.mean(0) - cam_origin) >= 0:
                continue  # back face
            poly = _clip_near(cam_pts[list(face)])
            if len(poly) < 3:
                continue
            uv = (poly @ k.T)[:, :2] / poly[:, 2:3]
            shade = 0.62 + 0.38 * max(0.0, float(normal @ LIGHT))
            if f == _FRONT_FACE:
                shade *= 0.55
            color = tuple(int(c) for c in np.clip(base * shade, 0, 255))
            draw.polygon([tuple(p) for p in uv.tolist()], fill=color, outline=tuple(int(c * 0.6) for c in color))
    return img


def _ray_cast(origin: np.ndarray, dirs: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray, float]]):
    """Distance to the first hit of each ray (inf if none), the box index hit (-1: ground or none),
    and for each box the number of rays that would hit it if nothing occluded it."""
    n_rays = len(dirs)
    best = np.full(n_rays, np.inf)
    hit_box = np.full(n_rays, -1)
    unoccluded = np.zeros(len(boxes), dtype=np.int64)
    for b, (center, lwh, yaw) in enumerate(boxes):
        c, s = math.cos(yaw), math.sin(yaw)
        rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])  # world -> box
        o = rot @ (origin - center)
        d = dirs @ rot.T
        half = lwh / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half - o) / d
            t2 = (half - o) / d
        tmin = np.nanmax(np.minimum(t1, t2), axis=1)
        tmax = np.nanmin(np.maximum(t1, t2), axis=1)
        hit = (tmax >= tmin) & (tmin > 0) & (tmin < LIDAR_RANGE)
        unoccluded[b] = int(hit.sum())
        closer = hit & (tmin < best)
        best[closer] = tmin[closer]
        hit_box[closer] = b
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
    ground = (t_ground < best) & (t_ground < LIDAR_RANGE)
    best[ground] = t_ground[ground]
    hit_box[ground] = -1
    return best, hit_box, unoccluded


def synthesize(cfg: SynthConfig) -> Path:
    """Write the synthetic tree to `cfg.out` and return its path."""
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out).resolve()
    version_dir = out / cfg.version
    version_dir.mkdir(parents=True, exist_ok=True)
    for sub in [*CAMERAS, LIDAR]:
        (out / "samples" / sub).mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(exist_ok=True)

    splits = split_scene_names(cfg.version)
    n_val = cfg.val_scenes if cfg.val_scenes is not None else max(1, round(cfg.scenes / 5))
    n_val = min(n_val, len(splits["val"]), cfg.scenes - 1)
    n_train = cfg.scenes - n_val
    if n_train > len(splits["train"]):
        raise ValueError(
            f"v1.0-mini has {len(splits['train'])} train and {len(splits['val'])} val scene names; "
            f"--scenes {cfg.scenes} is too many (use --samples-per-scene for more data)"
        )
    scene_names = splits["train"][:n_train] + splits["val"][:n_val]

    t = {
        name: []
        for name in (
            "attribute",
            "calibrated_sensor",
            "category",
            "ego_pose",
            "instance",
            "log",
            "map",
            "sample",
            "sample_annotation",
            "sample_data",
            "scene",
            "sensor",
            "visibility",
        )
    }
    attr_token = {a: _token("attribute", a) for a in ATTRIBUTES}
    t["attribute"] = [{"token": attr_token[a], "name": a, "description": a} for a in ATTRIBUTES]
    cat_token = {c: _token("category", CLASS_TO_CATEGORY[c]) for c in CLASSES}
    t["category"] = [
        {"token": cat_token[c], "name": CLASS_TO_CATEGORY[c], "description": f"synthetic {c}", "index": i}
        for i, c in enumerate(CLASSES)
    ]
    t["visibility"] = [
        {"token": tok, "level": lvl, "description": f"visibility {lvl}"} for tok, lvl in VISIBILITY_LEVELS
    ]
    sensor_token = {ch: _token("sensor", ch) for ch in [*CAMERAS, LIDAR]}
    t["sensor"] = [
        {"token": sensor_token[ch], "channel": ch, "modality": "lidar" if ch == LIDAR else "camera"}
        for ch in [*CAMERAS, LIDAR]
    ]
    locations = ("singapore-onenorth", "boston-seaport")
    map_logs: dict[str, list[str]] = {loc: [] for loc in locations}
    map_scenes: dict[str, list[_Scene]] = {loc: [] for loc in locations}

    w, h = cfg.image_width, cfg.image_height
    az = np.linspace(-math.pi, math.pi, cfg.lidar_azimuths, endpoint=False)
    el = np.radians(LIDAR_ELEVATIONS_DEG)
    ring = np.repeat(np.arange(len(el)), len(az)).astype(np.float32)
    el_g, az_g = np.meshgrid(el, az, indexing="ij")
    lidar_dirs_local = np.stack(
        [np.cos(el_g) * np.cos(az_g), np.cos(el_g) * np.sin(az_g), np.sin(el_g)], axis=-1
    ).reshape(-1, 3)

    total = cfg.scenes * cfg.samples_per_scene
    bar = tqdm(total=total, desc="synth: samples", unit="sample", disable=not cfg.show_progress)
    for si, name in enumerate(scene_names):
        scene = _Scene(rng, si, cfg.samples_per_scene, cfg.objects_per_scene)
        logname = f"n{si:03d}-2018-08-01-15-16-36-0400"
        log_token = _token("log", si)
        location = locations[si % 2]
        map_logs[location].append(log_token)
        map_scenes[location].append(scene)
        synth_map.write_can_bus(out, name, scene)
        t["log"].append(
            {
                "token": log_token,
                "logfile": logname,
                "vehicle": "n008",
                "date_captured": "2018-08-01",
                "location": location,
            }
        )
        scene_token = _token("scene", si)

        # Per-scene calibration with a small yaw jitter per camera, as every real log has its own.
        calib = {}
        for ch in CAMERAS:
            rot, pos = _camera_to_ego(ch, rng.normal(0, math.radians(0.3)))
            k = _intrinsic(ch, w, h)
            calib[ch] = (geo.transform(rot, pos), k, _background(k, w, h))
            t["calibrated_sensor"].append(
                {
                    "token": _token("calib", si, ch),
                    "sensor_token": sensor_token[ch],
                    "translation": pos.tolist(),
                    "rotation": geo.matrix_to_quat(rot).tolist(),
                    "camera_intrinsic": k.tolist(),
                }
            )
        lidar2ego = geo.transform(geo.rot_z(LIDAR_YAW), LIDAR_MOUNT)
        t["calibrated_sensor"].append(
            {
                "token": _token("calib", si, LIDAR),
                "sensor_token": sensor_token[LIDAR],
                "translation": list(LIDAR_MOUNT),
                "rotation": geo.yaw_to_quat(LIDAR_YAW).tolist(),
                "camera_intrinsic": [],
            }
        )

        sample_tokens = [_token("sample", si, k) for k in range(cfg.samples_per_scene)]
        prev_sd: dict = {ch: None for ch in [*CAMERAS, LIDAR]}
        for k, sample_token in enumerate(sample_tokens):
            ts = scene.t0_us + k * SAMPLE_PERIOD_US
            t_s = k * SAMPLE_PERIOD_US / 1e6
            t["sample"].append(
                {
                    "token": sample_token,
                    "timestamp": ts,
                    "scene_token": scene_token,
                    "prev": sample_tokens[k - 1] if k > 0 else "",
                    "next": sample_tokens[k + 1] if k + 1 < len(sample_tokens) else "",
                }
            )

            # LIDAR_TOP: ray cast from the lidar origin at the key-frame time.
            ego_m = scene.ego_matrix(t_s)
            lidar2global = ego_m @ lidar2ego
            origin = lidar2global[:3, 3]
            dirs = lidar_dirs_local @ lidar2global[:3, :3].T
            boxes_now = [(o.center(t_s), o.lwh, o.yaw) for o in scene.objects]
            dist, hit_box, unoccluded = _ray_cast(origin, dirs, boxes_now)
            valid = np.isfinite(dist)
            pts_global = origin + dirs[valid] * dist[valid, None]
            pts_lidar = geo.apply(np.linalg.inv(lidar2global), pts_global)
            intensity = np.where(hit_box[valid] >= 0, 60.0, 8.0) + rng.uniform(0, 4, size=int(valid.sum()))
            cloud = np.concatenate([pts_lidar, intensity[:, None], ring[valid, None]], axis=1).astype(np.float32)
            lidar_file = f"samples/{LIDAR}/{logname}__{LIDAR}__{ts}.pcd.bin"
            cloud.tofile(out / lidar_file)
            counts = np.bincount(hit_box[valid][hit_box[valid] >= 0], minlength=len(scene.objects))
            _add_sample_data(t, si, k, LIDAR, sample_token, ts, lidar_file, ego_m, prev_sd, 0, 0, "pcd")

            for ch in CAMERAS:
                ts_cam = ts + CAMERA_DELAY_US[ch]
                t_cam = t_s + CAMERA_DELAY_US[ch] / 1e6
                cam2ego, kmat, bg = calib[ch]
                ego_cam = scene.ego_matrix(t_cam)
                world2cam = np.linalg.inv(ego_cam @ cam2ego)
                boxes_cam = [(o.cls, o.center(t_cam), o.lwh, o.yaw) for o in scene.objects]
                img = render_camera(bg, kmat, world2cam, boxes_cam)
                cam_file = f"samples/{ch}/{logname}__{ch}__{ts_cam}.jpg"
                img.save(out / cam_file, quality=cfg.jpeg_quality)
                _add_sample_data(t, si, k, ch, sample_token, ts_cam, cam_file, ego_cam, prev_sd, w, h, "jpg")

            ego_xy = ego_m[:2, 3]
            for oi, obj in enumerate(scene.objects):
                if np.linalg.norm(obj.xy(t_s) - ego_xy) <= ANNOTATION_RANGE:
                    frac = counts[oi] / unoccluded[oi] if unoccluded[oi] else 0.0
                    obj.samples.append((k, int(counts[oi]), frac))
            bar.update(1)

        scene_anns = _annotate(t, scene, sample_tokens, attr_token, cat_token)
        t["scene"].append(
            {
                "token": scene_token,
                "log_token": log_token,
                "nbr_samples": len(sample_tokens),
                "first_sample_token": sample_tokens[0],
                "last_sample_token": sample_tokens[-1],
                "name": name,
                "description": f"synthetic scene, {scene_anns} annotations",
            }
        )
    bar.close()

    for loc in locations:
        if not map_logs[loc]:
            continue
        map_token = _token("map", loc)
        mask = np.zeros((200, 200), dtype=np.uint8)
        mask[60:140, :] = 255  # a road band; the devkit only needs a real PNG here
        Image.fromarray(mask).save(out / "maps" / f"{map_token}.png")
        t["map"].append(
            {
                "token": map_token,
                "log_tokens": map_logs[loc],
                "category": "semantic_prior",
                "filename": f"maps/{map_token}.png",
            }
        )

    synth_map.write_scene_maps(out, map_scenes)  # SparseDrive's map expansion, drawn under the ego paths

    for name, records in t.items():
        with open(version_dir / f"{name}.json", "w") as f:
            json.dump(records, f, indent=0)
    return out


def _add_sample_data(t, si, k, ch, sample_token, ts, filename, ego_m, prev_sd, width, height, fmt):
    sd_token = _token("sample_data", si, k, ch)
    ego_token = _token("ego_pose", si, k, ch)
    t["ego_pose"].append(
        {
            "token": ego_token,
            "timestamp": ts,
            "translation": ego_m[:3, 3].tolist(),
            "rotation": geo.matrix_to_quat(ego_m[:3, :3]).tolist(),
        }
    )
    record = {
        "token": sd_token,
        "sample_token": sample_token,
        "ego_pose_token": ego_token,
        "calibrated_sensor_token": _token("calib", si, ch),
        "timestamp": ts,
        "fileformat": fmt,
        "is_key_frame": True,
        "height": height,
        "width": width,
        "filename": filename,
        "prev": prev_sd[ch]["token"] if prev_sd[ch] else "",
        "next": "",
    }
    if prev_sd[ch]:
        prev_sd[ch]["next"] = sd_token
    t["sample_data"].append(record)
    prev_sd[ch] = record


def _annotate(t, scene: _Scene, sample_tokens, attr_token, cat_token) -> int:
    """sample_annotation and instance records; an object is annotated on a contiguous run of samples."""
    n = 0
    for obj in scene.objects:
        if not obj.samples:
            continue
        ks = [k for k, _, _ in obj.samples]
        first, last = min(ks), max(ks)
        seen = {k: (c, f) for k, c, f in obj.samples}
        tokens = [_token("ann", obj.token, k) for k in range(first, last + 1)]
        attribute = attribute_for(obj.cls, obj.speed)
        for idx, k in enumerate(range(first, last + 1)):
            count, frac = seen.get(k, (0, 0.0))
            level = "1" if frac < 0.4 else "2" if frac < 0.6 else "3" if frac < 0.8 else "4"
            t_s = k * SAMPLE_PERIOD_US / 1e6
            t["sample_annotation"].append(
                {
                    "token": tokens[idx],
                    "sample_token": sample_tokens[k],
                    "instance_token": obj.token,
                    "visibility_token": level,
                    "attribute_tokens": [attr_token[attribute]] if attribute else [],
                    "translation": obj.center(t_s).tolist(),
                    "size": obj.wlh.tolist(),
                    "rotation": geo.yaw_to_quat(obj.yaw).tolist(),
                    "prev": tokens[idx - 1] if idx > 0 else "",
                    "next": tokens[idx + 1] if idx + 1 < len(tokens) else "",
                    "num_lidar_pts": count,
                    "num_radar_pts": 0,
                }
            )
        t["instance"].append(
            {
                "token": obj.token,
                "category_token": cat_token[obj.cls],
                "nbr_annotations": len(tokens),
                "first_annotation_token": tokens[0],
                "last_annotation_token": tokens[-1],
            }
        )
        n += len(tokens)
    return n


def default_cache_dir() -> Path:
    """Where the embedded default data lives unless RAYDRIVE_CACHE says otherwise."""
    return Path(os.environ.get("RAYDRIVE_CACHE", Path.home() / ".cache" / "raydrive")).resolve()
