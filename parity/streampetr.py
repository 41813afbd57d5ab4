#!/usr/bin/env python
"""Fidelity check of raydrive's StreamPETR against upstream StreamPETR, stage by stage, in float64 on CPU.

    <upstream venv>/bin/python parity/streampetr.py --upstream /path/to/StreamPETR [--python-env-note]

Upstream is imported from its checkout (passed by path, never copied here): the model is built from
`projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py` through mmcv's `Config` and the
plugin import (`projects.mmdet3d_plugin`), on mmcv-full 1.7.2 / mmdet 2.28.2 / mmdet3d 1.0.0rc6. Its weights
are made non-trivial (every tensor whose init is a constant gets noise; VoVNet batch-norm statistics are
calibrated on the inputs, then perturbed), copied into raydrive's `full` preset with
`load_state_dict(strict=True)`, and both run two consecutive frames of one sequence (frame 2 through the
memory queue, with an ego motion and nuScenes-like timestamps) in eval mode (upstream `simple_test`) and
in train mode (upstream `forward_train`, denoising queries drawing the same noise from the same seed,
dropout off). Same-named modules are hooked on both sides; every stage prints max |diff| and the
reference's max |x|; the run exits 1 when a stage exceeds 1e-6.

Stand-ins (everything upstream needs that cannot run on a CPU-only machine) are in the STAND-INS
section below and only there; each says what it replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from _standins import standin_torchvision  # parity/ is on sys.path when a script runs

TOL = 1e-6
REPO = Path(__file__).resolve().parents[1]
CONFIG = "projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py"
KEYS_FILE = Path("/work/shared/specs/keys/streampetr_vov99_800.txt")

ENV_NOTE = """\
Upstream environment used by this script (outside the repository; nothing of it is committed):
  python3.11 -m venv /work/venvs/upstream; pip = /work/venvs/upstream/bin/pip
  pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0   (the CPU wheel, FIRST)
  pip install "setuptools<81" wheel ninja "numpy<2" addict pyyaml yapf pillow opencv-python scipy einops
  MMCV_WITH_OPS=1 MAX_JOBS=2 pip install --no-build-isolation mmcv-full==1.7.2   (about 12 min on 2 cores)
  pip install numba pycocotools terminaltables matplotlib six shapely scikit-image plyfile trimesh \\
      nuscenes-devkit==1.2.0 pyquaternion "pyarrow<26" lyft-dataset-sdk==0.0.8 tensorboard \\
      mmsegmentation==0.30.0 "numpy<2"                     (check the plan: no torch, no nvidia-*)
  pip install --no-deps torchvision==0.28.0 mmdet==2.28.2 mmdet3d==1.0.0rc6
  upstream checkout: exiawsh/StreamPETR (e.g. `git archive` of a mirror) at /work/upstream/StreamPETR
raydrive is imported from the checkout this script sits in (only its model modules: torch, numpy, scipy).
At run time: torchvision's CUDA-only registrations are stubbed (a CPU `torchvision::nms`), mmcv reports
1.7.0 to pass mmdet3d's `mmcv<=1.7.0` assert, `flash_attn`, `IPython` and `fvcore` are stand-in modules,
upstream's FlashAttention core is plain softmax attention, `.cuda()` is the identity, `.float()` keeps
float64 tensors in float64 (both sides) and mmcv's fp16 casts are off.
"""


# ======================================================================================================
# STAND-INS (only what a CPU-only machine lacks; each is labelled with what it replaces)
# ======================================================================================================


def _standin_modules():
    """STAND-IN: modules upstream imports at module level that this venv lacks: `flash_attn` (CUDA only;
    `models/utils/attention.py` imports `flash_attn_unpadded_kvpacked_func`, `unpad_input`, `pad_input`,
    `index_first_axis`; the FlashAttention core that calls them is replaced below), `IPython` (`embed`
    in the group sampler) and `fvcore.nn.weight_init` (EVA-ViT backbone, not built here)."""

    def _unavailable(*a, **k):
        raise RuntimeError("flash_attn stand-in: the CUDA kernel is not available (replaced by _flash_core)")

    mods = {
        "flash_attn": {},
        "flash_attn.flash_attn_interface": {"flash_attn_unpadded_kvpacked_func": _unavailable},
        "flash_attn.bert_padding": {n: _unavailable for n in ("unpad_input", "pad_input", "index_first_axis")},
        "IPython": {"embed": lambda *a, **k: None},
        "fvcore": {},
        "fvcore.nn": {},
        "fvcore.nn.weight_init": {"c2_xavier_fill": lambda m: None, "c2_msra_fill": lambda m: None},
    }
    for name, attrs in mods.items():
        if name in sys.modules:
            continue
        try:
            __import__(name)
            continue
        except Exception:
            pass
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mod.__path__ = []
        sys.modules[name] = mod


def _flash_core(self, q, kv, causal=False, key_padding_mask=None):
    """STAND-IN for upstream `FlashAttention.forward` (`models/utils/attention.py`), which asserts fp16 CUDA
    tensors and calls `flash_attn_unpadded_kvpacked_func` with no padding mask (the decoder passes
    `key_padding_mask=None`), non-causal, default softmax scale 1/sqrt(head_dim) and dropout
    `self.dropout_p` in training. That kernel computes softmax(q k^T / sqrt(d)) v per batch element and
    head; here the same math in the input dtype. q (B, T, H, D), kv (B, S, 2, H, D) -> ((B, T, H, D), None).
    Upstream builds FlashMHA with `attention_dropout` at its default 0 (the config's dropout lands in the
    `bias` argument), so `dropout_p` is 0 here as there."""
    assert key_padding_mask is None and not causal
    k, v = kv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    attn = attn.softmax(-1)
    if self.training and self.dropout_p > 0:
        attn = torch.nn.functional.dropout(attn, self.dropout_p)
    return (attn @ v).transpose(1, 2), None


@contextlib.contextmanager
def upstream_on_cpu():
    """STAND-IN: `StreamPETRHead.prepare_for_dn` does `torch.ones_like(t).cuda()` (a mask it only
    concatenates): here `.cuda()` is the identity. And (dtype only) `FocalHead._get_target_single`
    allocates its 2D-centre targets with `bbox_pred.new_full(..., dtype=torch.float32)` and index-puts
    float64 values into it: a float64 tensor's `new_full(dtype=float32)` stays float64 in this check."""
    orig_cuda, orig_new_full = torch.Tensor.cuda, torch.Tensor.new_full

    def new_full(self, *a, **k):
        if self.dtype == torch.float64 and k.get("dtype") == torch.float32:
            k["dtype"] = torch.float64
        return orig_new_full(self, *a, **k)

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.new_full = new_full
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.new_full = orig_cuda, orig_new_full


@contextlib.contextmanager
def keep_float64():
    """Both sides call `.float()` where their fp32 training wants fp32: upstream's
    `temporal_alignment` (`memory_ego_motion ... .float()`, `pos2posemb1d(...).float()`), raydrive's
    `model.py` (`extract_feat`, `_inputs`) and heads. In this float64 check `.float()` keeps a float64
    tensor in float64 (other dtypes convert as usual). Applied to both sides."""
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = orig


def lidar_boxes_float64():
    """STAND-IN (dtype only): mmdet3d's box containers store `torch.as_tensor(tensor, dtype=torch.float32)`.
    Upstream reads its GT (`gravity_center`, `tensor[:, 3:]`) and hands its decoded boxes through them; in
    this float64 check a subclass keeps the float64 tensor it was given (same values, same methods)."""
    from mmdet3d.core.bbox import LiDARInstance3DBoxes

    class LiDARInstance3DBoxes64(LiDARInstance3DBoxes):
        def __init__(self, tensor, box_dim=7, with_yaw=True, origin=(0.5, 0.5, 0)):
            super().__init__(tensor, box_dim=box_dim, with_yaw=with_yaw, origin=origin)
            src = torch.as_tensor(tensor)
            if src.is_floating_point() and src.shape == self.tensor.shape and tuple(origin) == (0.5, 0.5, 0):
                self.tensor = src.to(torch.float64).clone()

    return LiDARInstance3DBoxes64


def install_standins(upstream: Path):
    standin_torchvision()
    _standin_modules()
    import mmcv

    # mmdet3d 1.0.0rc6 asserts mmcv<=1.7.0 at import; 1.7.2 is API-compatible (OpenMMLab note).
    mmcv.__dict__.setdefault("_real_version", mmcv.__version__)
    mmcv.__version__ = "1.7.0"
    sys.path.insert(0, str(upstream))
    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))


# ======================================================================================================
# Models
# ======================================================================================================


def load_upstream_config(upstream: Path):
    """mmcv Config of the vov 800 config. Its `_base_` files live in a separate mmdetection3d checkout
    (dataset and runtime settings, nothing of the model): empty stand-ins at the relative path."""
    from mmcv import Config

    tmp = Path(tempfile.mkdtemp(prefix="streampetr_cfg_"))
    cfg_path = tmp / "a" / "b" / "c" / Path(CONFIG).name
    cfg_path.parent.mkdir(parents=True)
    shutil.copy(upstream / CONFIG, cfg_path)
    for base in ("datasets/nus-3d.py", "default_runtime.py"):
        p = tmp / "mmdetection3d/configs/_base_" / base
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    cfg = Config.fromfile(str(cfg_path))
    shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def build_upstream(upstream: Path, seed: int):
    import importlib

    cfg = load_upstream_config(upstream)
    importlib.import_module("projects.mmdet3d_plugin")
    from mmdet3d.models import build_model

    attention_mod = importlib.import_module("projects.mmdet3d_plugin.models.utils.attention")
    attention_mod.FlashAttention.forward = _flash_core  # STAND-IN, see _flash_core

    torch.manual_seed(seed)
    model = build_model(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    for m in model.modules():  # mmcv fp16 casts off: this check runs in float64
        if hasattr(m, "fp16_enabled"):
            m.fp16_enabled = False
    return model, cfg


def build_raydrive():
    from raydrive.models.streampetr.model import StreamPETR

    try:
        from raydrive.models.streampetr.presets import full

        mcfg, source = full().model, "presets.full().model"
    except Exception as e:  # the mapper behind presets needs raydrive.data (not in the upstream venv)
        from raydrive.models.streampetr.config import StreamPETRConfig

        mcfg, source = StreamPETRConfig(), f"StreamPETRConfig() (= presets.full().model; presets: {e!r})"
    return StreamPETR(mcfg), source


CONSTANTS = ("code_weights", "match_costs", "pc_range", "position_range", "coords_d")


def randomise(model: torch.nn.Module, seed: int):
    """Noise on every floating tensor whose init is one constant (norm affines, zero biases, MLN
    gamma/beta, the cls prior bias), so no stage is trivially equal. Constants of the head are left."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.state_dict(keep_vars=True).items()):
            if not t.is_floating_point() or name.split(".")[-1] in CONSTANTS or "running_" in name:
                continue
            if t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
                scale = 0.1 if t.dim() == 1 else 0.02
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)


def calibrate_bn(model, img: torch.Tensor, seed: int):
    """BatchNorm statistics of the VoVNet from the images themselves (cumulative average over one
    forward), then perturbed by a few percent: realistic scales through 99 layers, non-trivial values."""
    bns = [m for m in model.img_backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        model.img_backbone(img.flatten(0, 1))
        for m in bns:
            m.eval()
            m.momentum = 0.1
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.05)
            m.running_var.mul_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))
    return len(bns)


def no_dropout(model: torch.nn.Module):
    """Dropout off (p = 0) everywhere, so train mode is deterministic: nn.Dropout modules, the attention
    weight dropout of nn.MultiheadAttention (upstream), flash stand-in, raydrive's ProjectedAttention."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p, n = 0.0, n + 1
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout, n = 0.0, n + 1
        for attr in ("dropout_p", "attn_drop"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
                n += 1
    return n


# ======================================================================================================
# Inputs (nuScenes-like: 6 cameras around the car, one sequence of two frames)
# ======================================================================================================

CAM_YAWS = (0.0, -0.96, 0.96, math.pi, -1.9, 1.9)  # front, front-right, front-left, back, back-left/right


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _pose(yaw: float, t, roll: float = 0.0) -> np.ndarray:
    c, s = math.cos(roll), math.sin(roll)
    m = np.eye(4)
    m[:3, :3] = _rot_z(yaw) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    m[:3, 3] = t
    return m


def make_cameras(h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(6, 4, 4) lidar2img and intrinsics for an image of h x w (nuScenes 1600x900 focal, scaled)."""
    scale = w / 1600 * 1.05
    lidar2img, intrinsics = [], []
    # lidar (x fwd, y left, z up) -> camera looking along +x: cam x = -lidar y, cam y = -lidar z, cam z = lidar x
    axes = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0.0]])
    for i, yaw in enumerate(CAM_YAWS):
        K = np.eye(4)
        f = (1260 if i != 3 else 800) * scale * (1 + 0.02 * rng.standard_normal())
        K[0, 0], K[1, 1] = f, f * (1 + 0.001 * i)
        K[0, 2], K[1, 2] = w / 2 + rng.uniform(-4, 4), h / 2 + rng.uniform(-4, 4)
        cam2lidar = np.eye(4)
        cam2lidar[:3, :3] = (
            _rot_z(yaw)
            @ axes.T
            @ np.array(
                [[1, 0, 0], [0, math.cos(0.01 * i), -math.sin(0.01 * i)], [0, math.sin(0.01 * i), math.cos(0.01 * i)]]
            )
        )
        cam2lidar[:3, 3] = [1.0 * math.cos(yaw), 0.5 * math.sin(yaw), 1.6 + 0.05 * rng.standard_normal()]
        lidar2img.append(K @ np.linalg.inv(cam2lidar))
        intrinsics.append(K)
    return np.stack(lidar2img), np.stack(intrinsics)


def make_boxes(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(n, 9) centre boxes inside the BEV range and (n,) labels."""
    xy = rng.uniform(-45, 45, (n, 2))
    size = np.stack([rng.uniform(0.5, 10, n), rng.uniform(0.5, 3, n), rng.uniform(0.8, 3.5, n)], 1)
    z = rng.uniform(-2.5, 1.0, (n, 1)) + size[:, 2:3] / 2
    yaw = rng.uniform(-math.pi, math.pi, (n, 1))
    vel = rng.normal(0, 3, (n, 2))
    return np.concatenate([xy, z, size, yaw, vel], 1), rng.integers(0, 10, n)


def make_2d(h: int, w: int, rng, n_cams: int = 6):
    """Per camera 0-3 boxes (xyxy pixels inside the image), labels, centres inside the box, depths."""
    per_cam = []
    for c in range(n_cams):
        k = int(rng.integers(0, 4)) if c != 4 else 0  # camera 4 has none
        x1 = rng.uniform(0, w - 40, k)
        y1 = rng.uniform(0, h - 30, k)
        bw, bh = rng.uniform(8, 120, k), rng.uniform(8, 80, k)
        boxes = np.stack([x1, y1, np.minimum(x1 + bw, w - 1), np.minimum(y1 + bh, h - 1)], 1)
        cx = boxes[:, 0] + (boxes[:, 2] - boxes[:, 0]) * rng.uniform(0.2, 0.8, k)
        cy = boxes[:, 1] + (boxes[:, 3] - boxes[:, 1]) * rng.uniform(0.2, 0.8, k)
        per_cam.append(
            dict(
                bboxes=boxes.reshape(k, 4),
                labels=rng.integers(0, 10, k),
                centers=np.stack([cx, cy], 1).reshape(k, 2),
                depths=rng.uniform(2, 55, k),
            )
        )
    return per_cam


def make_frames(seed: int, batch: int, h: int, w: int):
    """Two consecutive frames of `batch` sequences: images, cameras, ego poses (a few metres and a few
    degrees apart, lidar -> global around (600, 1600) m), nuScenes-like timestamps 0.5 s apart, 3D and 2D GT."""
    rng = np.random.default_rng(seed)
    frames = []
    base = [_pose(rng.uniform(-3, 3), [600 + 10 * b, 1600 - 7 * b, 1.8], roll=0.01) for b in range(batch)]
    cams = [make_cameras(h, w, rng) for _ in range(batch)]
    t0 = 1533151603.547590
    for f in range(2):
        fr = dict(img=[], lidar2img=[], intrinsics=[], ego_pose=[], timestamp=[], boxes=[], labels=[], d2=[])
        for b in range(batch):
            motion = _pose(0.04 * f * (1 + b), [4.2 * f, 0.3 * f, 0.02 * f])
            fr["img"].append(rng.standard_normal((6, 3, h, w)))
            fr["lidar2img"].append(cams[b][0])
            fr["intrinsics"].append(cams[b][1])
            fr["ego_pose"].append(base[b] @ motion)
            fr["timestamp"].append(t0 + 0.5 * f + 0.013 * b)
            boxes, labels = make_boxes(11 - 4 * b + f, rng)  # per-slot counts differ (DN padding)
            fr["boxes"].append(boxes)
            fr["labels"].append(labels)
            fr["d2"].append(make_2d(h, w, rng))
        frames.append(fr)
    return frames


def raydrive_batch(fr, h: int, w: int) -> dict:
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    ego = t(fr["ego_pose"])
    batch = {
        "img": t(fr["img"]),
        "lidar2img": t(fr["lidar2img"]),
        "intrinsics": t(fr["intrinsics"]),
        "ego_pose": ego,
        "ego_pose_inv": torch.linalg.inv(ego),
        "timestamp": t(fr["timestamp"]),
        "pad_hw": torch.tensor([[h, w]] * len(fr["img"])),
        "gt_boxes": [t(b) for b in fr["boxes"]],
        "gt_labels": [torch.as_tensor(lab, dtype=torch.long) for lab in fr["labels"]],
    }
    for key, src in (("gt_bboxes2d", "bboxes"), ("gt_labels2d", "labels"), ("gt_centers2d", "centers")):
        batch[key] = [torch.cat([torch.as_tensor(c[src]) for c in d2]) for d2 in fr["d2"]]
    batch["gt_bboxes2d"] = [x.double().reshape(-1, 4) for x in batch["gt_bboxes2d"]]
    batch["gt_centers2d"] = [x.double().reshape(-1, 2) for x in batch["gt_centers2d"]]
    batch["gt_labels2d"] = [x.long() for x in batch["gt_labels2d"]]
    batch["gt_depths2d"] = [torch.cat([torch.as_tensor(c["depths"]) for c in d2]).double() for d2 in fr["d2"]]
    batch["gt_cams2d"] = [
        torch.cat([torch.full((len(c["labels"]),), i, dtype=torch.long) for i, c in enumerate(d2)]) for d2 in fr["d2"]
    ]
    return batch


def upstream_inputs(batch: dict, h: int, w: int, scene: str = "scene-0001"):
    """Upstream's data dict and img_metas for the same frame: gt boxes as LiDARInstance3DBoxes with the
    bottom centre (mmdet3d's convention; `gravity_center` gives the centre back)."""
    LiDARInstance3DBoxes = lidar_boxes_float64()
    B = batch["img"].shape[0]
    boxes3d, labels3d, metas = [], [], []
    for b in range(B):
        box = batch["gt_boxes"][b].clone()
        box[:, 2] -= box[:, 5] / 2
        boxes3d.append(LiDARInstance3DBoxes(box, box_dim=9))
        labels3d.append(batch["gt_labels"][b])
        metas.append(
            dict(
                pad_shape=[(h, w, 3)] * 6,
                img_shape=[(h, w, 3)] * 6,
                scene_token=scene,
                box_type_3d=LiDARInstance3DBoxes,  # float64-keeping stand-in, see lidar_boxes_float64
                gt_bboxes_3d=types.SimpleNamespace(_data=boxes3d[-1]),
                gt_labels_3d=types.SimpleNamespace(_data=labels3d[-1]),
            )
        )
    per_cam = {k: [] for k in ("gt_bboxes", "gt_labels", "centers2d", "depths")}
    for b in range(B):
        cams = batch["gt_cams2d"][b]
        for key, src in (
            ("gt_bboxes", "gt_bboxes2d"),
            ("gt_labels", "gt_labels2d"),
            ("centers2d", "gt_centers2d"),
            ("depths", "gt_depths2d"),
        ):
            per_cam[key].append([batch[src][b][cams == c] for c in range(6)])
    # clones: upstream edits inputs in place (`img.squeeze_()` in `extract_img_feat`)
    data = {k: batch[k].clone() for k in ("img", "lidar2img", "intrinsics", "ego_pose", "ego_pose_inv", "timestamp")}
    return data, metas, boxes3d, labels3d, per_cam


# ======================================================================================================
# Comparison helpers
# ======================================================================================================

ROWS: list[tuple[str, str, float, float, float, bool]] = []


def row(stage: str, value: float, kind: str = "max|diff|", tol: float = TOL, scale: float = float("nan")):
    ok = value <= tol
    ROWS.append((stage, kind, value, scale, tol, ok))
    print(f"  {'ok  ' if ok else 'FAIL'} {stage:<60} {kind:<10} {value:.3e}  (max|x| {scale:.3g})", flush=True)


def compare(stage: str, up, rd, tol: float = TOL):
    up, rd = torch.as_tensor(up), torch.as_tensor(rd)
    if up.shape != rd.shape:
        print(f"  FAIL {stage:<60} shape {tuple(up.shape)} vs {tuple(rd.shape)}")
        ROWS.append((stage, "shape", float("inf"), float("nan"), tol, False))
        return
    if not up.is_floating_point():
        n = int((up != rd).sum())
        row(stage, float(n), kind="mismatch", tol=0, scale=float(up.long().abs().max()) if up.numel() else 0.0)
        return
    if up.numel() == 0:
        row(stage, 0.0, scale=0.0)
        return
    nan_up, nan_rd = torch.isnan(up), torch.isnan(rd)
    if (nan_up != nan_rd).any():
        print(f"  FAIL {stage:<60} NaN positions differ ({int(nan_up.sum())} vs {int(nan_rd.sum())})")
        ROWS.append((stage, "nan", float("inf"), float("nan"), tol, False))
        return
    a, b = up.double()[~nan_up], rd.double()[~nan_rd]
    row(
        stage, float((a - b).abs().max()) if a.numel() else 0.0, tol=tol, scale=float(a.abs().max()) if a.numel() else 0
    )


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


class Hooks:
    """Records every call's output (and, for `inputs`, positional inputs) of named submodules."""

    def __init__(self, model, outputs, inputs=()):
        self.calls: dict[str, list] = {}
        self.handles = []
        for name in outputs:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_hook(self._hook(name)))
        for name in inputs:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_pre_hook(self._pre(name + ":in")))

    def _hook(self, key):
        def fn(module, args, out):
            self.calls.setdefault(key, []).append(_clone(out))

        return fn

    def _pre(self, key):
        def fn(module, args):
            self.calls.setdefault(key, []).append(_clone(args))

        return fn

    def reset(self):
        self.calls = {}

    def remove(self):
        for h in self.handles:
            h.remove()


HEAD = "pts_bbox_head"
OUT_HOOKS = [
    "img_backbone",
    "img_neck",
    f"{HEAD}.position_encoder",
    f"{HEAD}.memory_embed",
    f"{HEAD}.spatial_alignment",
    f"{HEAD}.featurized_pe",
    f"{HEAD}.query_embedding",
    f"{HEAD}.ego_pose_pe",
    f"{HEAD}.ego_pose_memory",
    f"{HEAD}.time_embedding",
    f"{HEAD}.cls_branches.0",
    f"{HEAD}.reg_branches.0",
    f"{HEAD}.transformer",
] + [f"{HEAD}.transformer.decoder.layers.{i}" for i in range(6)]
IN_HOOKS = [f"{HEAD}.spatial_alignment", f"{HEAD}.transformer"]


def compare_stages(tag: str, up: Hooks, rd: Hooks, topk: torch.Tensor | None):
    """Stage outputs recorded on both sides. `topk` (B, L, 1): upstream's token order in training (its
    FocalHead returns the tokens sorted by score even when it keeps all; raydrive keeps camera-major
    order and None): raydrive's per-token tensors are gathered with it before comparing."""
    from raydrive.models.streampetr.head import gather_tokens

    def tok(x):
        return x if topk is None else gather_tokens(x, topk)

    U, R = up.calls, rd.calls
    for i, (a, b) in enumerate(zip(U["img_backbone"][0], R["img_backbone"][0])):
        compare(f"{tag} backbone stage{4 + i}", a, b)
    for i, (a, b) in enumerate(zip(U["img_neck"][0], R["img_neck"][0])):
        compare(f"{tag} neck level {i}", a, b)
    compare(
        f"{tag} 3D PE: position_encoder (MLP of the lifted rays)",
        U[f"{HEAD}.position_encoder"][0],
        tok(R[f"{HEAD}.position_encoder"][0]),
    )
    compare(
        f"{tag} 3D PE: cone (focal, ray ends) for spatial alignment",
        U[f"{HEAD}.spatial_alignment:in"][0][1],
        tok(R[f"{HEAD}.spatial_alignment:in"][0][1]),
    )
    compare(f"{tag} memory_embed (image tokens)", U[f"{HEAD}.memory_embed"][0], tok(R[f"{HEAD}.memory_embed"][0]))
    compare(f"{tag} spatial_alignment (MLN)", U[f"{HEAD}.spatial_alignment"][0], tok(R[f"{HEAD}.spatial_alignment"][0]))
    compare(f"{tag} featurized_pe (final key pos)", U[f"{HEAD}.featurized_pe"][0], tok(R[f"{HEAD}.featurized_pe"][0]))
    names = {
        "query_embedding": ("queries", "memory"),
        "ego_pose_memory": ("queries", "memory"),
        "ego_pose_pe": ("queries", "memory"),
        "time_embedding": ("queries", "memory"),
    }
    for name, what in names.items():
        ua, ra = U[f"{HEAD}.{name}"], R[f"{HEAD}.{name}"]
        if len(ua) != len(ra):
            print(f"  FAIL {tag} {name}: {len(ua)} vs {len(ra)} calls")
            ROWS.append((f"{tag} {name} calls", "calls", float("inf"), float("nan"), 0, False))
            continue
        for i, (a, b) in enumerate(zip(ua, ra)):
            compare(f"{tag} {name} ({what[i]})", a, b)
    # decoder inputs: upstream (memory, tgt, query_pos, pos_embed, attn_masks, temp_memory, temp_pos)
    ui, ri = U[f"{HEAD}.transformer:in"][0], R[f"{HEAD}.transformer:in"][0]
    compare(f"{tag} decoder in: tgt (queries + propagated)", ui[1], ri[0])
    compare(f"{tag} decoder in: query_pos", ui[2], ri[2])
    compare(f"{tag} decoder in: image tokens (key/value)", ui[0], tok(ri[1]))
    compare(f"{tag} decoder in: temp_memory", ui[5], ri[4])
    compare(f"{tag} decoder in: temp_pos", ui[6], ri[5])
    if ui[4] is None or ri[6] is None:
        row(f"{tag} decoder in: attn_mask both None", float((ui[4] is None) != (ri[6] is None)), "mismatch", 0, 0)
    else:
        compare(f"{tag} decoder in: attn_mask (DN)", ui[4], ri[6])
    for i in range(6):
        compare(
            f"{tag} decoder layer {i} output",
            U[f"{HEAD}.transformer.decoder.layers.{i}"][0].transpose(0, 1),
            R[f"{HEAD}.transformer.decoder.layers.{i}"][0],
        )
    compare(f"{tag} decoder all layers after post_norm", U[f"{HEAD}.transformer"][0][0], R[f"{HEAD}.transformer"][0])
    for i in range(6):
        compare(f"{tag} layer {i} cls logits", U[f"{HEAD}.cls_branches.0"][i], R[f"{HEAD}.cls_branches.0"][i])
        compare(f"{tag} layer {i} reg branch (raw)", U[f"{HEAD}.reg_branches.0"][i], R[f"{HEAD}.reg_branches.0"][i])


def compare_head_out(tag: str, up: dict, rd: dict):
    compare(f"{tag} all_cls_scores (6 layers)", up["all_cls_scores"], rd["all_cls_scores"])
    compare(f"{tag} all_bbox_preds (6 layers, xyz metres)", up["all_bbox_preds"], rd["all_bbox_preds"])
    ud, rdn = up.get("dn_mask_dict"), rd.get("dn_mask_dict")
    if (ud is None) != (rdn is None):
        row(f"{tag} dn_mask_dict presence", 1.0, "mismatch", 0, 0)
        return
    if ud is None:
        return
    row(f"{tag} DN pad_size ({ud['pad_size']})", float(ud["pad_size"] != rdn["pad_size"]), "mismatch", 0, 0)
    compare(f"{tag} DN known labels (noised -> background)", ud["known_lbs_bboxes"][0], rdn["known_labels"])
    compare(f"{tag} DN known boxes", ud["known_lbs_bboxes"][1], rdn["known_bboxs"])
    compare(f"{tag} DN map_known_indice", ud["map_known_indice"], rdn["map_known_indice"])
    compare(f"{tag} DN cls (6 layers)", ud["output_known_lbs_bboxes"][0], rdn["output_known_lbs_bboxes"][0])
    compare(f"{tag} DN boxes (6 layers)", ud["output_known_lbs_bboxes"][1], rdn["output_known_lbs_bboxes"][1])


def compare_memory(tag: str, head_up, rd_model):
    st = rd_model.temporal_state()
    for up_name, rd_name in (
        ("memory_embedding", "embedding"),
        ("memory_reference_point", "reference_point"),
        ("memory_timestamp", "timestamp"),
        ("memory_egopose", "egopose"),
        ("memory_velo", "velo"),
    ):
        compare(f"{tag} memory {rd_name} (after the frame)", getattr(head_up, up_name), st[rd_name])


# ======================================================================================================
# Runs
# ======================================================================================================


def run_eval(up, rd, frames, h, w):
    print("\n== eval mode (upstream Petr3D.simple_test; raydrive StreamPETR.predict), B=1", flush=True)
    up.eval(), rd.eval()
    up.pts_bbox_head.reset_memory()
    up.prev_scene_token = None
    rd.reset_state(None)
    hu, hr = Hooks(up, OUT_HOOKS + [HEAD], IN_HOOKS), Hooks(rd, OUT_HOOKS + [HEAD], IN_HOOKS)
    coder = up.pts_bbox_head.bbox_coder
    coder_out: list = []
    orig_decode = coder.decode

    def recording_decode(*a, **k):  # upstream get_bboxes shifts z in place afterwards: keep a clone
        out = orig_decode(*a, **k)
        coder_out.append(_clone(out))
        return out

    coder.decode = recording_decode
    try:
        for f, fr in enumerate(frames):
            tag = f"eval f{f + 1}"
            batch = raydrive_batch({k: v[:1] for k, v in fr.items()}, h, w)
            data, metas, *_ = upstream_inputs(batch, h, w)
            hu.reset(), hr.reset()
            coder_out.clear()
            t0 = time.time()
            with torch.no_grad(), upstream_on_cpu():
                res_up = up.simple_test(metas, **data)
            t1 = time.time()
            res_rd = rd.predict(batch)
            print(f"  frame {f + 1}: upstream {t1 - t0:.1f}s, raydrive {time.time() - t1:.1f}s", flush=True)
            compare_stages(tag, hu, hr, None)
            compare_head_out(tag, hu.calls[HEAD][0], hr.calls[HEAD][0])
            compare_memory(tag, up.pts_bbox_head, rd)
            pb = res_up[0]["pts_bbox"]
            dec = rd.pts_bbox_head.decode(hr.calls[HEAD][0])[0]
            n = len(pb["scores_3d"])
            compare(
                f"{tag} NMSFreeCoder boxes (centre z, {n}) vs predict()", coder_out[0][0]["bboxes"], res_rd[0]["boxes"]
            )
            compare(f"{tag} get_bboxes boxes_3d (bottom z) vs head.decode", pb["boxes_3d"].tensor, dec["boxes_3d"])
            compare(f"{tag} decoded scores", pb["scores_3d"], res_rd[0]["scores"])
            compare(f"{tag} decoded labels", pb["labels_3d"], res_rd[0]["labels"])
    finally:
        hu.remove(), hr.remove()
        coder.decode = orig_decode


# upstream FocalHead's loss names -> raydrive's (the 3D head's names are upstream's)
LOSS_NAMES = {
    "enc_loss_cls": "loss_cls2d",
    "enc_loss_bbox": "loss_bbox2d",
    "enc_loss_iou": "loss_iou2d",
    "centers2d_losses": "loss_centers2d",
    "centerness_losses": "loss_centerness",
}


def run_train(up, rd, frames, h, w, batch_size: int, seed: int):
    print(f"\n== train mode (upstream Petr3D.forward_train, queue 1; raydrive StreamPETR.forward), B={batch_size}")
    up.train(), rd.train()
    up.pts_bbox_head.reset_memory()
    rd.reset_state(None)
    up_out_hooks = OUT_HOOKS + [HEAD, "img_roi_head"]
    hu, hr = Hooks(up, up_out_hooks, IN_HOOKS), Hooks(rd, up_out_hooks, IN_HOOKS)
    try:
        for f, fr in enumerate(frames):
            tag = f"train f{f + 1}"
            batch = raydrive_batch({k: v[:batch_size] for k, v in fr.items()}, h, w)
            data, metas, boxes3d, labels3d, per_cam = upstream_inputs(batch, h, w)
            B = batch_size
            up_data = {k: v.unsqueeze(1) for k, v in data.items()}  # (B, T=1, ...)
            up_data["img"] = data["img"].unsqueeze(1)
            up_data["prev_exists"] = torch.full((B, 1), float(f > 0), dtype=torch.float64)
            hu.reset(), hr.reset()
            t0 = time.time()
            torch.manual_seed(seed + 10 + f)  # the DN noise: first random draw of both forwards
            with upstream_on_cpu():
                loss_up = up.forward_train(
                    img_metas=[metas],
                    gt_bboxes_3d=[boxes3d],
                    gt_labels_3d=[labels3d],
                    gt_bboxes=[per_cam["gt_bboxes"]],
                    gt_labels=[per_cam["gt_labels"]],
                    centers2d=[per_cam["centers2d"]],
                    depths=[per_cam["depths"]],
                    **up_data,
                )
            t1 = time.time()
            torch.manual_seed(seed + 10 + f)
            loss_rd = rd(batch)
            print(f"  frame {f + 1}: upstream {t1 - t0:.1f}s, raydrive {time.time() - t1:.1f}s", flush=True)
            up_roi, rd_roi = hu.calls["img_roi_head"][0], hr.calls["img_roi_head"][0]
            topk = up_roi["topk_indexes"]
            n_tok = batch["img"].shape[1] * rd_roi["enc_cls_scores"].shape[1]
            perm_ok = (
                topk is not None
                and topk.shape[1] == n_tok
                and bool((topk[..., 0].sort(1).values == torch.arange(n_tok)).all())
            )
            row(
                f"{tag} 2D topk: upstream keeps all tokens (permuted), raydrive None",
                float(not (perm_ok and rd_roi["topk_indexes"] is None)),
                "mismatch",
                0,
                0,
            )
            for key in ("enc_cls_scores", "enc_bbox_preds", "pred_centers2d", "centerness"):
                compare(f"{tag} 2D head {key}", up_roi[key], rd_roi[key])
            compare_stages(tag, hu, hr, topk if perm_ok else None)
            compare_head_out(tag, hu.calls[HEAD][0], hr.calls[HEAD][0])
            compare_memory(tag, up.pts_bbox_head, rd)
            loss_up = {LOSS_NAMES.get(k[8:], k[8:]): v for k, v in loss_up.items()}  # k = "frame_0_<name>"
            missing = sorted(set(loss_up) ^ set(loss_rd))
            row(
                f"{tag} loss keys ({len(loss_up)} upstream){' ' + str(missing) if missing else ''}",
                float(len(missing)),
                "mismatch",
                0,
                0,
            )
            for k in sorted(set(loss_up) & set(loss_rd)):
                compare(f"{tag} loss {k}", loss_up[k], loss_rd[k])
            compare(f"{tag} loss total", sum(loss_up.values()), sum(loss_rd.values()))
    finally:
        hu.remove(), hr.remove()


def check_keys(up, rd):
    sd = up.state_dict()
    print(f"upstream state dict: {len(sd)} keys")
    if KEYS_FILE.exists():
        lines = [line for line in KEYS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
        spec = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines}
        bad = sum(1 for k in set(spec) | set(sd) if k not in spec or k not in sd or spec[k] != str(tuple(sd[k].shape)))
        row(f"state dict keys+shapes vs {KEYS_FILE.name} ({len(spec)})", float(bad), "mismatch", 0, 0)
        n_params = sum(p.numel() for p in up.parameters())
        print(f"  upstream parameters: {n_params:,}; raydrive: {sum(p.numel() for p in rd.parameters()):,}")
    rd_sd = rd.state_dict()
    row("state dict keys upstream vs raydrive (set)", float(len(set(sd) ^ set(rd_sd))), "mismatch", 0, 0)
    shapes = sum(1 for k in sd if k in rd_sd and sd[k].shape != rd_sd[k].shape)
    row("state dict shapes", float(shapes), "mismatch", 0, 0)
    rd.load_state_dict(sd, strict=True)
    print("  strict load of upstream's state dict into raydrive: ok")


def print_env_note():
    print(ENV_NOTE)
    vers = {}
    for name in ("torch", "numpy", "scipy", "mmcv", "mmdet", "mmdet3d"):
        try:
            mod = __import__(name)
            vers[name] = getattr(mod, "_real_version", getattr(mod, "__version__", "?"))
        except Exception as e:  # pragma: no cover - informational
            vers[name] = f"not importable ({type(e).__name__})"
    print("found: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f"; python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, type=Path, help="path of an upstream StreamPETR checkout")
    ap.add_argument("--python-env-note", action="store_true", help="print how the upstream environment is built")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument(
        "--hw",
        type=int,
        nargs=2,
        default=(128, 352),
        metavar=("H", "W"),
        help="image size (multiples of 32; the full preset trains at 320 800)",
    )
    ap.add_argument("--train-batch", type=int, default=2, help="batch slots in train mode (eval is B=1 upstream)")
    ap.add_argument("--only", choices=("all", "eval", "train"), default="all")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)  # mmcv's per-tensor init report
    install_standins(args.upstream.resolve())
    if args.python_env_note:
        print_env_note()
    t_start = time.time()
    h, w = args.hw

    with keep_float64():
        up, _ = build_upstream(args.upstream.resolve(), args.seed)
        rd, source = build_raydrive()
        print(f"built upstream Petr3D from {CONFIG} and raydrive StreamPETR from {source}; float64, CPU, {h}x{w}")
        # grid mask: random per call from different generators (numpy vs torch) on the two sides; off in both
        up.use_grid_mask = False
        rd.grid_mask = None
        up.double(), rd.double()
        frames = make_frames(args.seed, max(args.train_batch, 1), h, w)
        randomise(up, args.seed)
        n_bn = calibrate_bn(up, torch.as_tensor(np.asarray(frames[0]["img"][:1])), args.seed)
        print(f"randomised constant-initialised tensors; calibrated {n_bn} VoVNet BN layers on frame 1")
        print(f"dropout off: upstream {no_dropout(up)} modules/attrs, raydrive {no_dropout(rd)}")
        check_keys(up, rd)
        if args.only in ("all", "eval"):
            run_eval(up, rd, frames, h, w)
        if args.only in ("all", "train"):
            run_train(up, rd, frames, h, w, args.train_batch, args.seed)

    failed = [r for r in ROWS if not r[5]]
    print(f"\n== summary ({len(ROWS)} checks, {time.time() - t_start:.0f}s, tolerance {TOL:g} unless stated)")
    print(f"{'stage':<70} {'metric':<10} {'value':>10} {'max|x|':>10}  result")
    for stage, kind, value, scale, _tol, ok in ROWS:
        print(f"{stage:<70} {kind:<10} {value:>10.3e} {scale:>10.3g}  {'ok' if ok else 'FAIL'}")
    print(f"\n{len(ROWS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
