#!/usr/bin/env python
"""Fidelity check of raydrive's BEVDepth against upstream BEVDepth, stage by stage, in float64 on CPU.

    <upstream venv>/bin/python parity/bevdepth.py --upstream /path/to/BEVDepth [--python-env-note]

Upstream is imported from its checkout (passed by path, never copied here): the 2key exp
(`bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py`) is instantiated only to read
the backbone and head confs it hands `BaseBEVDepth`, and for its own `training_step`, `get_depth_loss`
and `eval_step`. The model is upstream's `BaseBEVDepth` on mmcv-full 1.7.2 / mmdet 2.28.2 / mmdet3d 1.0.0rc4.
Its weights are randomised (batch-norm affine and statistics, the deformable conv's offset branch,
which upstream zero-initialises), copied into raydrive's `full` preset with `load_state_dict(strict=True)`,
and both get the same random images and nuScenes-like camera, image-augmentation and BEV-augmentation
matrices. Each stage prints its max abs difference; the run exits 1 when any stage exceeds 1e-6.

Stand-ins (everything upstream needs that cannot run on a CPU-only machine) are in the STAND-INS
section below and only there; each says what it replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import math
import platform
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

ENV_NOTE = """\
Upstream environment used by this script (outside the repository; nothing of it is committed):
  python -m venv /work/venvs/upstream; pip = /work/venvs/upstream/bin/pip
  pip install torch==2.13.0          (the CPU wheel, FIRST, so nothing pulls a CUDA torch)
  pip install "setuptools<81" wheel ninja "numpy<2" addict pyyaml yapf pillow opencv-python
  MMCV_WITH_OPS=1 MAX_JOBS=2 pip install --no-build-isolation mmcv-full==1.7.2   (12-46 min on 2 cores)
  pip install numba pycocotools terminaltables matplotlib scipy six shapely scikit-image plyfile trimesh \\
      nuscenes-devkit==1.2.0 pyquaternion "pyarrow<26" lyft-dataset-sdk==0.0.8 tensorboard \\
      mmsegmentation==0.30.0 "numpy<2"                     (check the plan: no torch, no nvidia-*)
  pip install --no-deps torchvision==0.28.0 mmdet==2.28.2 mmdet3d==1.0.0rc4   (rc4: BEVDepth's pin)
  git clone <BEVDepth repository> /work/upstream/BEVDepth    (its CUDA ops are NOT built)
raydrive is imported from the checkout this script sits in.
At run time: torchvision's CUDA-only registrations are stubbed (a CPU `torchvision::nms`), mmcv reports
1.7.0 to pass mmdet3d's `mmcv<=1.7.0` assert, pytorch_lightning is a stand-in module, and upstream's
voxel-pooling CUDA extensions are Python functions that do what their kernels do.
"""


# ======================================================================================================
# STAND-INS (only what a CPU-only machine lacks; each is labelled with what it replaces)
# ======================================================================================================

RECORD: dict[str, list] = {}


def _record(key, value):
    RECORD.setdefault(key, []).append(value)


def _standin_pytorch_lightning():
    """STAND-IN: pytorch_lightning 1.6 (upstream's pin) is not installed; the exp modules import
    `LightningModule`, `Callback` and `pl.Trainer` at module level. The exp class is used only to read
    its confs and to call its own `training_step` / `get_depth_loss` / `eval_step`, whose `self.log`
    calls are recorded here."""
    if "pytorch_lightning" in sys.modules:
        return
    pl = types.ModuleType("pytorch_lightning")
    core = types.ModuleType("pytorch_lightning.core")
    callbacks = types.ModuleType("pytorch_lightning.callbacks")

    class LightningModule(torch.nn.Module):
        def save_hyperparameters(self, *args, **kwargs):
            pass

        def log(self, name, value, *args, **kwargs):
            _record(f"upstream_log/{name}", value.detach().clone() if torch.is_tensor(value) else value)

    class Callback:
        pass

    class Trainer:
        pass

    core.LightningModule = LightningModule
    callbacks.Callback = Callback
    pl.core, pl.callbacks, pl.Trainer, pl.LightningModule = core, callbacks, Trainer, LightningModule
    pl.seed_everything = lambda seed, *a, **k: torch.manual_seed(seed)
    sys.modules.update(
        {"pytorch_lightning": pl, "pytorch_lightning.core": core, "pytorch_lightning.callbacks": callbacks}
    )


def _vp_train_forward_wrapper(
    batch_size,
    num_points,
    num_channels,
    num_voxel_x,
    num_voxel_y,
    num_voxel_z,
    geom_xyz,
    input_features,
    output_features,
    pos_memo,
):
    """STAND-IN for upstream's compiled `voxel_pooling_train_ext.voxel_pooling_train_forward_wrapper`, written
    from `bevdepth/ops/voxel_pooling_train/src/voxel_pooling_train_forward_cuda.cu`: point i of batch
    b = i // num_points with cell (x, y, z) is kept iff 0 <= x < X, 0 <= y < Y, 0 <= z < Z; a kept point's
    C features are atomically added to output_features[b, y, x, :] and pos_memo[i] = (b, y, x); dropped
    points leave pos_memo at -1. The upstream autograd Function around it (forward reshapes, backward
    gather through pos_memo) is upstream's own code."""
    b, p = int(batch_size), int(num_points)
    nx, ny, nz = int(num_voxel_x), int(num_voxel_y), int(num_voxel_z)
    g = geom_xyz.reshape(b, p, 3).long()
    x, y, z = g.unbind(-1)
    kept = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    bi = torch.arange(b).view(b, 1).expand(b, p)
    feats = input_features.reshape(b, p, int(num_channels))
    output_features.index_put_((bi[kept], y[kept], x[kept]), feats[kept], accumulate=True)
    memo = pos_memo.view(b, p, 3)
    memo[kept] = torch.stack([bi[kept], y[kept], x[kept]], -1).to(memo.dtype)
    _record(
        "upstream_pool",
        dict(mode="train", geom=geom_xyz.detach().reshape(b, p, 3).clone(), feats=feats.detach().clone()),
    )


def _vp_inference_forward_wrapper(
    batch_size,
    num_cams,
    num_depth,
    num_height,
    num_width,
    num_channels,
    num_voxel_x,
    num_voxel_y,
    num_voxel_z,
    geom_xyz,
    depth_features,
    context_features,
    output_features,
):
    """STAND-IN for upstream's compiled `voxel_pooling_inference_ext.voxel_pooling_inference_forward_wrapper`,
    written from `bevdepth/ops/voxel_pooling_inference/src/voxel_pooling_inference_forward_cuda.cu`: sample
    s of the (B, N, D, H, W) grid with cell (x, y, z) inside the grid adds depth[b*N+n, d, h, w] *
    context[b*N+n, c, h, w] to output_features[b, y, x, c] for every channel c."""
    b, n, d, h, w, c = (int(v) for v in (batch_size, num_cams, num_depth, num_height, num_width, num_channels))
    nx, ny, nz = int(num_voxel_x), int(num_voxel_y), int(num_voxel_z)
    p = n * d * h * w
    feats = depth_features.view(b, n, d, h, w, 1) * context_features.view(b, n, c, h, w).permute(
        0, 1, 3, 4, 2
    ).unsqueeze(2)
    feats = feats.reshape(b, p, c)
    g = geom_xyz.reshape(b, p, 3).long()
    x, y, z = g.unbind(-1)
    kept = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    bi = torch.arange(b).view(b, 1).expand(b, p)
    output_features.index_put_((bi[kept], y[kept], x[kept]), feats[kept], accumulate=True)
    _record(
        "upstream_pool",
        dict(mode="eval", geom=geom_xyz.detach().reshape(b, p, 3).clone(), depth=depth_features.detach().clone()),
    )


def _standin_voxel_pooling_exts():
    """STAND-IN: upstream's `voxel_pooling_{train,inference}_ext` are CUDA extensions (not built here)."""
    for pkg, fn_name, fn in (
        ("voxel_pooling_train", "voxel_pooling_train_forward_wrapper", _vp_train_forward_wrapper),
        ("voxel_pooling_inference", "voxel_pooling_inference_forward_wrapper", _vp_inference_forward_wrapper),
    ):
        name = f"bevdepth.ops.{pkg}.{pkg}_ext"
        mod = types.ModuleType(name)
        setattr(mod, fn_name, fn)
        sys.modules[name] = mod


@contextlib.contextmanager
def upstream_on_cpu():
    """STAND-IN: upstream moves things to CUDA in code the CPU run goes through: `self.voxel_num.cuda()` in
    `BaseLSSFPN._forward_single_sweep`, `depth_labels.cuda()` in `training_step` and `device='cuda'` in
    `BEVDepthHead.get_targets_single` (`new_zeros`, `torch.tensor`). Here `.cuda()` is the identity and
    device='cuda' means the CPU."""
    orig_cuda, orig_new_zeros, orig_tensor = torch.Tensor.cuda, torch.Tensor.new_zeros, torch.tensor

    def _cpu(kwargs):
        if "device" in kwargs and str(kwargs["device"]).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.new_zeros = lambda self, *a, **k: orig_new_zeros(self, *a, **_cpu(k))
    torch.tensor = lambda *a, **k: orig_tensor(*a, **_cpu(k))
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.new_zeros, torch.tensor = orig_cuda, orig_new_zeros, orig_tensor


@contextlib.contextmanager
def keep_float64():
    """Both heads start with `x = x.float()` (upstream `BEVDepthHead.forward`, raydrive
    `BEVDepthHead.forward`) and raydrive returns `logits.float().softmax(1)` for the depth loss: in a float64
    check these keep float64 tensors in float64 (other dtypes convert as usual). Upstream's
    `get_depth_loss` builds its one-hot labels with `.float()` (fp32) and hands them to
    `F.binary_cross_entropy` with the float64 prediction, which needs equal dtypes: the target is cast
    to the prediction's dtype (0/1 values, exact). Applied to both sides."""
    import torch.nn.functional as F

    orig_float, orig_bce = torch.Tensor.float, F.binary_cross_entropy
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig_float(self, *a, **k)
    F.binary_cross_entropy = lambda input, target, *a, **k: orig_bce(input, target.to(input.dtype), *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float, F.binary_cross_entropy = orig_float, orig_bce


def install_standins(upstream: Path):
    standin_torchvision()
    import mmcv

    # mmdet3d 1.0.0rc4 asserts mmcv<=1.7.0 at import; 1.7.2 is API-compatible (OpenMMLab note).
    mmcv.__dict__.setdefault("_real_version", mmcv.__version__)
    mmcv.__version__ = "1.7.0"
    _standin_pytorch_lightning()
    _standin_voxel_pooling_exts()
    # this file is parity/bevdepth.py: its folder must not shadow upstream's `bevdepth` package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(upstream))
    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))


# ======================================================================================================
# Models
# ======================================================================================================

EXP = "bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key"


def build_upstream(seed: int, workdir: str):
    """The 2key exp's own `BaseBEVDepth(backbone_conf, head_conf, is_train_depth=True)`, in float64. The
    exp's __init__ runs with `BaseBEVDepth` swapped for a recorder so the confs are exactly what it passes
    (the 2key class edits head_conf after its base class built a first model); the only conf change is
    dropping the backbone's `init_cfg=Pretrained(torchvision://resnet50)` (no network; weights are random
    and copied anyway)."""
    exp_mod = importlib.import_module(EXP)
    base_exp = importlib.import_module("bevdepth.exps.nuscenes.base_exp")
    from bevdepth.models.base_bev_depth import BaseBEVDepth

    calls = []

    class Recorder:
        def __init__(self, backbone_conf, head_conf, is_train_depth=False):
            calls.append((copy.deepcopy(backbone_conf), copy.deepcopy(head_conf), is_train_depth))

    exp_mod.BaseBEVDepth = base_exp.BaseBEVDepth = Recorder
    try:
        exp = exp_mod.BEVDepthLightningModel(default_root_dir=workdir)
    finally:
        exp_mod.BaseBEVDepth = base_exp.BaseBEVDepth = BaseBEVDepth
    backbone_conf, head_conf, is_train_depth = calls[-1]
    backbone_conf["img_backbone_conf"].pop("init_cfg", None)
    torch.manual_seed(seed)
    model = BaseBEVDepth(backbone_conf, head_conf, is_train_depth=is_train_depth)
    exp.model = model
    return exp, model.double(), (backbone_conf, head_conf, is_train_depth)


def randomise(model: torch.nn.Module, seed: int):
    """Make every parameter matter: upstream's init leaves batch norms at identity (and zeroes the last
    BN of each mmdet ResNet block) and zeroes the DCN's offset branch. Batch-norm affine parameters get
    random values; the DCN's offset conv gets weights that give offsets of a few pixels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
            if name.endswith("conv_offset"):
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=m.bias.dtype) * 4 - 2)


def calibrate_bn(exp, model, imgs, mats):
    """Set batch-norm running statistics to the statistics of these inputs (one train-mode pass with
    momentum 1), so the eval-mode forward sees normalised activations, not exploding ones."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad(), upstream_on_cpu(), keep_float64():
        model(imgs, mats)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        m.num_batches_tracked.zero_()
    RECORD.clear()


def build_raydrive():
    from raydrive.models.bevdepth.model import BEVDepth
    from raydrive.models.bevdepth.presets import full

    return BEVDepth(full().model).double()


# ======================================================================================================
# Inputs: nuScenes-like rig, test/train image augmentation, BEV augmentation
# ======================================================================================================

CAM_YAWS_DEG = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)  # FRONT_LEFT, FRONT, FRONT_RIGHT, BACK_LEFT, BACK, BACK_RIGHT


def _rot(axis: str, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _ida(rng, train: bool) -> np.ndarray:
    """Upstream `img_transform` as a 4x4: resize, crop (bottom rows), flip, rotation about the crop centre."""
    W, H, fw, fh = 1600, 900, 704, 256
    if train:
        r = rng.uniform(0.386, 0.55)
        rw, rh = int(W * r), int(H * r)
        crop_w, crop_h = int(rng.uniform(0, max(0, rw - fw))), rh - fh
        flip, rot = bool(rng.random() < 0.5), rng.uniform(-5.4, 5.4)
    else:
        r, crop_w, crop_h, flip, rot = 0.44, 0, int(H * 0.44) - fh, False, 0.0
    m = np.eye(3) * [r, r, 1]
    m = np.array([[1, 0, -crop_w], [0, 1, -crop_h], [0, 0, 1]]) @ m
    if flip:
        m = np.array([[-1, 0, fw], [0, 1, 0], [0, 0, 1]]) @ m
    a = math.radians(rot)
    rot2 = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    centre = np.array([fw / 2, fh / 2])
    rmat = np.eye(3)
    rmat[:2, :2], rmat[:2, 2] = rot2, -rot2 @ centre + centre
    m = rmat @ m
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = m[:2, :2], m[:2, 2]
    return out


def make_inputs(seed: int, train: bool, batch: int = 1):
    """Images (B, 2, 6, 3, 256, 704) and the upstream mats dict, float64: nuScenes-like intrinsics and
    camera poses, the previous key frame 0.6 m behind with 1.5 deg of yaw, a BEV augmentation."""
    rng = np.random.default_rng(seed)
    S, N = 2, 6
    s2e, intrin, ida = np.zeros((batch, S, N, 4, 4)), np.zeros((batch, S, N, 4, 4)), np.zeros((batch, S, N, 4, 4))
    bda = np.zeros((batch, 4, 4))
    cam_axes = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # camera (x right, y down, z fwd) -> ego
    for b in range(batch):
        prev_ego = np.eye(4)  # previous ego -> current ego
        prev_ego[:3, :3], prev_ego[:3, 3] = _rot("z", math.radians(1.5)), [-0.6, 0.05, 0.0]
        for n, yaw in enumerate(CAM_YAWS_DEG):
            k = np.eye(4)
            k[0, 0], k[1, 1] = rng.uniform(1250, 1270), rng.uniform(1250, 1270)
            k[0, 2], k[1, 2] = 800 + rng.uniform(-20, 20), 450 + rng.uniform(-20, 20)
            c2e = np.eye(4)
            y = math.radians(yaw)
            tilt = _rot("x", rng.normal(0, 0.01)) @ _rot("y", rng.normal(0, 0.01))
            c2e[:3, :3] = _rot("z", y) @ cam_axes @ tilt
            c2e[:3, 3] = [1.0 + 0.7 * math.cos(y), 0.5 * math.sin(y), 1.55 + rng.normal(0, 0.02)]
            a = _ida(rng, train)
            for s in range(S):
                intrin[b, s, n], ida[b, s, n] = k, a
                s2e[b, s, n] = c2e if s == 0 else prev_ego @ c2e
        rot = math.radians(rng.uniform(-22.5, 22.5)) if train else 0.0
        scale = rng.uniform(0.95, 1.05) if train else 1.0
        m = _rot("z", rot) * scale
        if train:
            m = np.diag([1.0, -1.0, 1.0]) @ m  # flip y
        bda[b] = np.eye(4)
        bda[b, :3, :3] = m
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn((batch, S, N, 3, 256, 704), generator=gen, dtype=torch.float64)
    t = lambda a: torch.from_numpy(a).to(torch.float64)  # noqa: E731
    mats = dict(
        sensor2ego_mats=t(s2e),
        intrin_mats=t(intrin),
        ida_mats=t(ida),
        sensor2sensor_mats=t(np.broadcast_to(np.eye(4), s2e.shape).copy()),
        bda_mat=t(bda),
    )
    return imgs, mats


# classes: car, truck, construction_vehicle, bus, trailer, barrier, motorcycle, bicycle, pedestrian, traffic_cone
GT = [  # x, y, z (centre), l, w, h, yaw, vx, vy, label
    (10.3, 4.1, -0.8, 4.6, 1.9, 1.7, 0.3, 5.0, 0.4, 0),
    (11.1, 4.6, -0.7, 4.4, 1.8, 1.6, 0.25, 4.5, 0.2, 0),  # overlaps the one above
    (-22.7, 13.9, -0.5, 4.8, 2.0, 1.8, -2.8, 0.0, 0.0, 0),
    (25.2, -8.3, -0.2, 9.5, 2.7, 3.2, 1.2, -1.0, 3.0, 1),
    (-30.4, -30.9, 0.1, 6.2, 2.9, 3.0, 2.0, 0.0, 0.0, 2),
    (40.0, 12.6, 0.4, 11.8, 2.9, 3.4, -0.6, 2.0, -1.0, 3),
    (-5.3, -45.1, 0.0, 12.0, 2.9, 3.8, 0.1, 0.0, 0.0, 4),
    (6.2, -7.5, -1.0, 0.5, 2.5, 1.0, 1.57, 0.0, 0.0, 5),
    (-8.8, 2.2, -0.9, 2.1, 0.8, 1.5, -1.0, 1.0, 1.0, 6),
    (15.6, -19.4, -0.9, 1.7, 0.6, 1.3, 0.8, 0.5, 2.0, 7),
    (3.3, 9.9, -0.9, 0.7, 0.7, 1.8, 3.0, 0.8, -0.3, 8),
    (3.9, 10.3, -0.9, 0.6, 0.6, 1.7, 2.0, 0.7, -0.1, 8),
    (-12.0, -3.1, -1.1, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0, 9),
    (60.0, 2.0, -0.5, 4.5, 1.9, 1.6, 0.0, 0.0, 0.0, 0),  # outside the grid
]


def make_targets(seed: int, batch: int = 1):
    """GT boxes (float32, as upstream's dataset gives them) and a sparse lidar-like depth map (B, 6, 256, 704)
    with ~3% of the pixels set, some depths outside [2, 58)."""
    boxes = [torch.tensor([g[:9] for g in GT], dtype=torch.float32) for _ in range(batch)]
    labels = [torch.tensor([g[9] for g in GT], dtype=torch.long) for _ in range(batch)]
    gen = torch.Generator().manual_seed(seed + 1)
    depth = torch.rand((batch, 6, 256, 704), generator=gen, dtype=torch.float64) * 64 + 0.5
    depth = torch.where(torch.rand(depth.shape, generator=gen) < 0.03, depth, torch.zeros_like(depth))
    return boxes, labels, depth.float()


# ======================================================================================================
# Comparison helpers
# ======================================================================================================

ROWS: list[tuple[str, str, float, float, bool]] = []


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def maxabs(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def row(stage: str, value: float, kind: str = "max|diff|", tol: float = TOL, scale=None):
    ok = value <= tol
    ROWS.append((stage, kind, value, tol, ok))
    extra = f"  (ref max|x| {scale:.3g})" if scale is not None else ""
    print(f"  {'ok  ' if ok else 'FAIL'} {stage:<58} {kind:<12} {value:.3e}{extra}", flush=True)


def compare(stage: str, up, rd, tol: float = TOL):
    try:
        d = maxabs(up, rd)
        scale = float(torch.as_tensor(up).double().abs().max()) if torch.as_tensor(up).numel() else 0.0
    except ValueError as e:
        print(f"  FAIL {stage:<58} {e}")
        ROWS.append((stage, "shape", float("inf"), tol, False))
        return
    row(stage, d, tol=tol, scale=scale)


def count(stage: str, mismatches: int):
    row(stage, float(mismatches), kind="mismatches", tol=0)


class Hooks:
    """Forward hooks recording the outputs (detached clones) of same-named modules on one model."""

    def __init__(self, model, names, prefix):
        self.handles = []
        for name in names:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_hook(self._hook(f"{prefix}/{name}")))
            self.handles.append(mod.register_forward_pre_hook(self._pre(f"{prefix}/{name}:in")))

    @staticmethod
    def _clone(x):
        if torch.is_tensor(x):
            return x.detach().clone()
        if isinstance(x, (list, tuple)):
            return type(x)(Hooks._clone(v) for v in x)
        if isinstance(x, dict):
            return {k: Hooks._clone(v) for k, v in x.items()}
        return x

    def _hook(self, key):
        return lambda m, i, o: _record(key, self._clone(o))

    def _pre(self, key):
        return lambda m, i: _record(key, self._clone(i[0]))

    def remove(self):
        for h in self.handles:
            h.remove()


HOOKED = [
    "backbone.img_backbone",
    "backbone.img_neck",
    "backbone.depth_net",
    "head",
    "head.trunk.layer1",
    "head.trunk.layer2",
    "head.trunk.layer3",
    "head.neck",
    "head.shared_conv",
]


def wrap_raydrive(rd):
    """Record raydrive's geometry and voxel-pooling calls (its module global `voxel_pooling` and its
    `geometry` method, wrapped; nothing else changes)."""
    import raydrive.models.bevdepth.lss as rd_lss

    orig_pool = rd_lss.voxel_pooling

    def pool(geom, feats, voxel_num, *a, **k):
        out = orig_pool(geom, feats, voxel_num, *a, **k)
        _record(
            "raydrive_pool",
            dict(geom=geom.detach().reshape(geom.shape[0], -1, 3).clone(), feats=feats.detach().clone()),
        )
        return out

    rd_lss.voxel_pooling = pool
    orig_geom = rd.backbone.geometry

    def geometry(*a, **k):
        out = orig_geom(*a, **k)
        _record("raydrive_geom", out.detach().clone())
        return out

    rd.backbone.geometry = geometry


def wrap_upstream(up):
    orig = up.backbone.get_geometry

    def get_geometry(*a, **k):
        out = orig(*a, **k)
        _record("upstream_geom", out.detach().clone())
        return out

    up.backbone.get_geometry = get_geometry


# ======================================================================================================
# Checks
# ======================================================================================================


def check_keys(up, rd, keys_file: Path | None):
    sd = up.state_dict()
    n_params = sum(p.numel() for p in up.parameters())
    n_all = sum(v.numel() for v in sd.values())
    print(f"upstream state dict: {len(sd)} keys, {n_params:,} parameters, {n_all:,} numbers incl. buffers")
    if keys_file and keys_file.exists():
        spec = [ln.split()[0] for ln in keys_file.read_text().splitlines() if ln and not ln.startswith("#")]
        missing, extra = sorted(set(spec) - set(sd)), sorted(set(sd) - set(spec))
        row("upstream keys == specs/keys/bevdepth_r50_2key.txt", float(len(missing) + len(extra)), "mismatches", 0)
        if missing or extra:
            print(f"    missing {missing[:5]} extra {extra[:5]}")
    rd_sd = rd.state_dict()
    res = rd.load_state_dict(sd, strict=True)
    row(
        "raydrive load_state_dict(upstream, strict=True)",
        float(len(res.missing_keys) + len(res.unexpected_keys)),
        "mismatches",
        0,
    )
    shape = sum(1 for k in sd if k in rd_sd and tuple(rd_sd[k].shape) != tuple(sd[k].shape))
    row("state dict shapes", float(shape), "mismatches", 0)


def compare_features(prefix: str, frames=(0, 1)):
    """Image backbone C2..C5, neck, depth net logits and context, geometry, cell indices, per frame."""
    up, rd = lambda k: RECORD[f"up/{k}"], lambda k: RECORD[f"rd/{k}"]
    D = 112
    for f in frames:
        tag = "key" if f == 0 else "prev"
        for lvl, (a, b) in enumerate(zip(up("backbone.img_backbone")[f], rd("backbone.img_backbone")[f])):
            compare(f"{prefix} {tag}: image backbone C{lvl + 2}", a, b)
        compare(
            f"{prefix} {tag}: image neck (B*N,512,16,44)",
            _first(up("backbone.img_neck")[f]),
            _first(rd("backbone.img_neck")[f]),
        )
        a, b = up("backbone.depth_net")[f], rd("backbone.depth_net")[f]
        compare(f"{prefix} {tag}: depth logits (B*N,112,16,44)", a[:, :D], b[:, :D])
        compare(f"{prefix} {tag}: context (B*N,80,16,44)", a[:, D:], b[:, D:])
        ga, gb = RECORD["upstream_geom"][f], RECORD["raydrive_geom"][f]
        compare(f"{prefix} {tag}: geometry xyz (float)", ga, gb)
        ca, cb = RECORD["upstream_pool"][f]["geom"], RECORD["raydrive_pool"][f]["geom"]
        mis = int((ca.long() != cb.long()).any(-1).sum()) if ca.shape == cb.shape else 10**9
        count(f"{prefix} {tag}: cell indices ({ca.shape[1]} points)", mis)
        if f == 0 and prefix == "eval":
            inside = (
                (ca[..., 0] >= 0) & (ca[..., 0] < 128) & (ca[..., 1] >= 0) & (ca[..., 1] < 128) & (ca[..., 2] == 0)
            ).float()
            print(
                f"    frustum points inside the grid: {int(inside.sum())} of {ca.shape[1]}"
                f" ({100 * float(inside.mean()):.1f}%)"
            )


def compare_bev_and_head(prefix: str):
    up, rd = lambda k: RECORD[f"up/{k}"], lambda k: RECORD[f"rd/{k}"]
    bev_u, bev_r = up("head:in")[0], rd("head:in")[0]
    compare(f"{prefix} key: BEV after voxel pooling (B,80,128,128)", bev_u[:, :80], bev_r[:, :80])
    compare(f"{prefix} prev: BEV after voxel pooling (B,80,128,128)", bev_u[:, 80:], bev_r[:, 80:])
    compare(f"{prefix} fused BEV (B,160,128,128)", bev_u, bev_r)
    for i in (1, 2, 3):
        compare(f"{prefix} BEV trunk layer{i}", up(f"head.trunk.layer{i}")[0], rd(f"head.trunk.layer{i}")[0])
    compare(f"{prefix} BEV neck (B,256,128,128)", _first(up("head.neck")[0]), _first(rd("head.neck")[0]))
    compare(f"{prefix} head shared conv", up("head.shared_conv")[0], rd("head.shared_conv")[0])
    pu, pr = upstream_preds(up("head")[0]), rd("head")[0]
    for t in range(6):
        for name in ("heatmap", "reg", "height", "dim", "rot", "vel"):
            compare(f"{prefix} head task {t}: {name}", pu[t][name], pr[t][name])
    return pu, pr


def upstream_preds(ret):
    """Upstream head output `([task0_dict], [task1_dict], ...)` -> list of dicts."""
    return [r[0] for r in ret]


def compare_decode(stage, up_res, rd_res):
    """Upstream `get_bboxes` / `eval_step` result [boxes, scores, labels] vs raydrive's dict."""
    ub, us, ul = (torch.as_tensor(np.asarray(x)) for x in up_res[:3])
    rb, rs, rl = rd_res["boxes"], rd_res["scores"], rd_res["labels"]
    count(f"{stage}: number of boxes ({len(ub)} upstream)", abs(len(ub) - len(rb)))
    if len(ub) == len(rb):
        compare(f"{stage}: boxes", ub, rb)
        compare(f"{stage}: scores", us, rs)
        count(f"{stage}: labels", int((ul.long() != rl.long()).sum()))


def run_eval(exp, up, rd, imgs, mats):
    """Eval mode: the whole forward (upstream uses voxel_pooling_inference here), decoding."""
    print("\n== eval mode (upstream: voxel_pooling_inference; decode through exp.eval_step / get_bboxes)", flush=True)
    up.eval(), rd.eval()
    RECORD.clear()
    hu, hr = Hooks(up, HOOKED, "up"), Hooks(rd, HOOKED, "rd")
    t0 = time.time()
    with torch.no_grad(), upstream_on_cpu(), keep_float64():
        up_results = exp.eval_step((imgs, dict(mats), None, [dict()], None, None), 0, "val")
    t1 = time.time()
    batch = dict(img=imgs, **{k: v for k, v in mats.items() if k != "sensor2sensor_mats"})
    with keep_float64():
        rd_results = rd.predict(batch)
    t2 = time.time()
    print(f"  forward + decode: upstream {t1 - t0:.1f}s, raydrive {t2 - t1:.1f}s", flush=True)
    hu.remove(), hr.remove()
    compare_features("eval")
    ua = RECORD["upstream_pool"][0]
    D = 112
    depth_r = RECORD["rd/backbone.depth_net"][0][:, :D].softmax(1)
    compare("eval key: depth softmax (upstream pooling input vs softmax of raydrive logits)", ua["depth"], depth_r)
    pu, pr = compare_bev_and_head("eval")
    # decoding on each side's own head output ...
    for i, (u, r) in enumerate(zip(up_results, rd_results)):
        compare_decode(f"eval decode sample {i}", u, r)
    # ... and on the same (upstream's) head output, which isolates the decoder
    with torch.no_grad(), upstream_on_cpu(), keep_float64():
        same_u = up.get_bboxes([[dict(p)] for p in pu], [dict()])
        same_r = rd.head.decode([dict(p) for p in pu])
        for t, p in enumerate(pu):
            dec_u = up.head.bbox_coder.decode(
                p["heatmap"].sigmoid(),
                p["rot"][:, 0:1],
                p["rot"][:, 1:2],
                p["height"],
                torch.exp(p["dim"]),
                p["vel"],
                reg=p["reg"],
                task_id=t,
            )
            dec_r = rd.head._decode_task(p) if hasattr(rd.head, "_decode_task") else None
            if dec_r is not None:
                count(
                    f"decode (same head output) task {t}: pre-NMS count",
                    abs(len(dec_u[0]["bboxes"]) - len(dec_r[0]["boxes"])),
                )
                if len(dec_u[0]["bboxes"]) == len(dec_r[0]["boxes"]):
                    compare(f"decode (same head output) task {t}: pre-NMS boxes", dec_u[0]["bboxes"], dec_r[0]["boxes"])
    for i, (u, r) in enumerate(zip(same_u, same_r)):
        compare_decode(f"decode (same head output) sample {i}", u, r)
    return pu


def run_train(exp, up, rd, imgs, mats, boxes, labels, depth, seed, backward):
    """Train mode: upstream's own `training_step` (voxel_pooling_train, targets, detection and depth loss)
    vs raydrive's forward; the ASPP dropout masks are equal because both draw them from the same seed in
    the same order. Then the gradients of every parameter."""
    print("\n== train mode (upstream: exp.training_step with voxel_pooling_train)", flush=True)
    up_state = {k: v.clone() for k, v in up.state_dict().items()}  # BN statistics move in train mode
    rd_state = {k: v.clone() for k, v in rd.state_dict().items()}
    up.train(), rd.train()
    RECORD.clear()
    hu, hr = Hooks(up, HOOKED + ["backbone"], "up"), Hooks(rd, HOOKED + ["backbone"], "rd")
    up.zero_grad(set_to_none=True), rd.zero_grad(set_to_none=True)
    t0 = time.time()
    with upstream_on_cpu(), keep_float64():
        torch.manual_seed(seed)
        up_loss = exp.training_step((imgs, dict(mats), None, None, boxes, labels, depth[:, None]))
        if backward:
            up_loss.backward()
    t1 = time.time()
    batch = dict(img=imgs, gt_boxes=boxes, gt_labels=labels, depth_labels=depth)
    batch.update({k: v for k, v in mats.items() if k != "sensor2sensor_mats"})
    with keep_float64():
        torch.manual_seed(seed)
        rd_losses = rd(batch)
        rd_loss = sum(rd_losses.values())
        if backward:
            rd_loss.backward()
    t2 = time.time()
    print(
        f"  forward + loss{' + backward' if backward else ''}: upstream {t1 - t0:.1f}s, raydrive {t2 - t1:.1f}s",
        flush=True,
    )
    hu.remove(), hr.remove()
    compare_features("train")
    for f in (0, 1):
        tag = "key" if f == 0 else "prev"
        compare(
            f"train {tag}: lifted depth x context (B,N,D,H,W,80)",
            RECORD["upstream_pool"][f]["feats"],
            RECORD["raydrive_pool"][f]["feats"].reshape(RECORD["upstream_pool"][f]["feats"].shape),
        )
    depth_u = RECORD["up/backbone"][0][1]
    depth_r = RECORD["rd/backbone"][0][1]
    compare("train key: depth distribution (softmax) returned for the loss", depth_u, depth_r)
    compare_bev_and_head("train")
    # losses
    logs = {k.split("/", 1)[1]: v[-1] for k, v in RECORD.items() if k.startswith("upstream_log/")}
    det_r = sum(v for k, v in rd_losses.items() if k != "loss_depth")
    compare("loss: detection (sum over tasks)", logs["detection_loss"], det_r)
    compare("loss: depth", logs["depth_loss"], rd_losses["loss_depth"])
    compare("loss: total", up_loss.detach(), rd_loss.detach())
    print(f"    detection {float(logs['detection_loss']):.6f}, depth {float(logs['depth_loss']):.6f}")
    if backward:
        gu = {n: p.grad for n, p in up.named_parameters() if p.grad is not None}
        gr = {n: p.grad for n, p in rd.named_parameters() if p.grad is not None}
        count("gradients: parameters with a gradient", len(set(gu) ^ set(gr)))
        worst, name = 0.0, ""
        for n in sorted(set(gu) & set(gr)):
            d = maxabs(gu[n], gr[n])
            if d > worst:
                worst, name = d, n
        scale = max(float(g.abs().max()) for g in gu.values())
        row(f"gradients: all parameters, abs (worst: {name or '-'})", worst, scale=scale)
        row("gradients: all parameters, max|diff| / max|grad|", worst / scale, kind="relative")
    with torch.no_grad():
        for model, state in ((up, up_state), (rd, rd_state)):
            for k, v in model.state_dict().items():
                v.copy_(state[k])
    return RECORD["up/head"][0]


def run_targets_and_losses(exp, up, rd, preds_raw, boxes, labels, depth):
    """Targets, per-task losses and the depth loss on the same inputs (upstream's train-mode head output),
    which isolates them from the forward."""
    print("\n== targets and losses on the same head output", flush=True)
    pu = upstream_preds(preds_raw)
    with torch.no_grad(), upstream_on_cpu(), keep_float64():
        tu = up.get_targets(boxes, labels)
        hm = pu[0]["heatmap"].shape[-2:]
        tr = rd.head.targets([b.float() for b in boxes], labels, hm)
        names = ("heatmap", "anno_box", "ind", "mask")
        for t in range(6):
            for i, name in enumerate(names):
                a, b = tu[i][t], tr[t][i]
                if name in ("ind", "mask"):
                    count(
                        f"targets task {t}: {name}", int((a.long() != b.long()).sum()) if a.shape == b.shape else 10**9
                    )
                else:
                    compare(f"targets task {t}: {name}", a, b)
        fresh = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731  (mmdet3d's clip_sigmoid is in place)
        for t in range(6):
            lu = up.head.loss(tuple([x[t]] for x in tu), [[fresh(pu[t])]])
            lr = rd.head.loss([fresh(pu[t])], [tr[t]])
            compare(f"loss task {t}: heatmap + bbox", lu, sum(lr.values()))
        du = exp.get_depth_loss(depth, RECORD["up/backbone"][0][1])
        dr = rd.depth_loss(depth, RECORD["up/backbone"][0][1])
        compare("loss: depth (same prediction)", du, dr)


def init_stats(model) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v.detach().double().flatten()
            out[k] = (
                float(v.min()),
                float(v.max()),
                float(v.mean()),
                float(v.std()) if v.numel() > 1 else 0.0,
                v.numel(),
            )
    return out


def compare_init(up_stats: dict, rd_stats: dict) -> list[str]:
    """Fresh (not copied) weights: which tensors does raydrive initialise differently from upstream's
    build? Constant tensors must be the same constant; random ones (>= 256 values) the same std (within
    20%), mean (within 0.1 std or 5 standard errors) and spread (max - min over std, within 25%: uniform
    vs normal). The image backbone is left out: upstream loads torchvision's ImageNet ResNet-50 into it
    (`init_cfg=Pretrained(torchvision://resnet50)`, dropped in this offline build)."""
    diffs = []
    for k, (mn, mx, mean, std, n) in up_stats.items():
        if k not in rd_stats or k.endswith(("frustum", "voxel_size", "voxel_coord")) or ".img_backbone." in k:
            continue
        rmn, rmx, rmean, rstd, _ = rd_stats[k]
        desc = lambda a, b, m, s: f"const {a:g}" if a == b else f"mean {m:.3g} std {s:.3g} range [{a:.3g}, {b:.3g}]"  # noqa: E731
        if mn == mx or rmn == rmx:
            bad = not (mn == mx and rmn == rmx and mn == rmn)
        elif n >= 256:
            spread, rspread = (mx - mn) / std, (rmx - rmn) / rstd
            mean_tol = max(0.1, 5 / math.sqrt(n)) * max(std, rstd)
            bad = not (0.8 < rstd / std < 1.25) or abs(rmean - mean) > mean_tol or not (0.8 < rspread / spread < 1.25)
        else:
            bad = False
        if bad:
            diffs.append(f"{k}: upstream {desc(mn, mx, mean, std)} | raydrive {desc(rmn, rmx, rmean, rstd)}")
    return diffs


def check_deform_conv(seed: int):
    """raydrive's DeformConv2dPack vs mmcv's (DepthNet's layer: 512 -> 512, 3x3, pad 1, groups 4,
    im2col_step 128) with the same weights and random non-zero offsets, in float64 (float32 too),
    forward and gradients."""
    print("\n== deformable conv: raydrive DeformConv2dPack vs mmcv.ops.DeformConv2dPack", flush=True)
    from mmcv.ops import DeformConv2dPack as MMCVDeform

    from raydrive.ops.deform_conv import DeformConv2dPack

    for dtype in (torch.float64, torch.float32):
        tag = str(dtype).replace("torch.", "")
        torch.manual_seed(seed)
        ref = MMCVDeform(512, 512, 3, padding=1, groups=4, im2col_step=128).to(dtype)
        ours = DeformConv2dPack(512, 512, 3, padding=1, groups=4, im2col_step=128).to(dtype)
        with torch.no_grad():
            ref.conv_offset.weight.normal_(0, 0.02)
            ref.conv_offset.bias.uniform_(-3, 3)
        res = ours.load_state_dict(ref.state_dict(), strict=True)
        assert not res.missing_keys and not res.unexpected_keys
        x = torch.randn(2, 512, 16, 44, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        try:
            ya = ref(xa)
        except RuntimeError as e:
            print(f"  mmcv DeformConv2dPack CPU forward in {tag} fails: {str(e).splitlines()[0]}")
            row(f"deform conv {tag}: mmcv CPU forward runs", 1.0, "failed", 0)
            continue
        yb = ours(xb)
        off = ref.conv_offset(x)
        print(f"    offsets in [{float(off.min()):.2f}, {float(off.max()):.2f}] px")
        tol = TOL if dtype == torch.float64 else 1e-3
        compare(f"deform conv {tag}: forward", ya, yb, tol)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        compare(f"deform conv {tag}: grad input", xa.grad, xb.grad, tol)
        compare(f"deform conv {tag}: grad weight", ref.weight.grad, ours.weight.grad, tol * 10)
        compare(
            f"deform conv {tag}: grad offset conv", ref.conv_offset.weight.grad, ours.conv_offset.weight.grad, tol * 10
        )


# ======================================================================================================


def env_note():
    import mmcv
    import mmdet
    import mmdet3d

    print(ENV_NOTE)
    print(
        f"found: python {platform.python_version()}, torch {torch.__version__}, "
        f"mmcv-full {getattr(mmcv, '_real_version', mmcv.__version__)} (reported as {mmcv.__version__}), "
        f"mmdet {mmdet.__version__}, mmdet3d {mmdet3d.__version__}, numpy {np.__version__}\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, type=Path, help="path of an upstream BEVDepth checkout")
    ap.add_argument("--python-env-note", action="store_true", help="print how the upstream environment is built")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--no-backward", action="store_true", help="skip the gradient comparison")
    ap.add_argument("--only", choices=("all", "eval", "train", "dcn"), default="all")
    ap.add_argument(
        "--keys",
        type=Path,
        default=REPO.parent / "shared/specs/keys/bevdepth_r50_2key.txt",
        help="upstream key list to check the built model against (skipped when absent)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    upstream = args.upstream.resolve()
    if not (upstream / "bevdepth/models/base_bev_depth.py").exists():
        ap.error(f"{upstream} is not a BEVDepth checkout (no bevdepth/models/base_bev_depth.py)")
    install_standins(upstream)
    import mmdet3d  # noqa: F401  (after the version stand-in)
    from mmcv.utils import get_logger

    get_logger("mmcv", log_level=logging.WARNING)  # quiet the per-parameter init reports
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    if args.python_env_note:
        env_note()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        exp, up, confs = build_upstream(args.seed, workdir)
        rd = build_raydrive()
        init_diffs = compare_init(init_stats(up), init_stats(rd))
        randomise(up, args.seed + 7)
        wrap_upstream(up)
        wrap_raydrive(rd)
        print(f"built upstream BaseBEVDepth (is_train_depth={confs[2]}) and raydrive BEVDepth(full) in float64")
        if args.only in ("all", "eval", "train"):
            imgs, mats = make_inputs(args.seed, train=False)
            calibrate_bn(exp, up, imgs, mats)
            check_keys(up, rd, args.keys)
        if args.only in ("all", "eval"):
            run_eval(exp, up, rd, imgs, mats)
        if args.only in ("all", "train"):
            imgs, mats = make_inputs(args.seed + 1, train=True)
            boxes, labels, depth = make_targets(args.seed)
            preds = run_train(exp, up, rd, imgs, mats, boxes, labels, depth, args.seed + 3, not args.no_backward)
            run_targets_and_losses(exp, up, rd, preds, boxes, labels, depth)
        if args.only in ("all", "dcn"):
            check_deform_conv(args.seed)
    if init_diffs:
        print(
            f"\n== initialisation differences (fresh weights, not copied; informational, not counted: "
            f"{len(init_diffs)} tensors; the image backbone is not compared, upstream loads ImageNet weights)"
        )
        for d in init_diffs:
            print(f"  {d}")
    failed = [r for r in ROWS if not r[4]]
    print(f"\n== summary ({len(ROWS)} checks, {time.time() - t_start:.0f}s, tolerance {TOL:g} unless stated)")
    print(f"{'stage':<66} {'metric':<12} {'value':>10}  {'tol':>8}  result")
    for stage, kind, value, tol, ok in ROWS:
        print(f"{stage:<66} {kind:<12} {value:>10.3e}  {tol:>8.0e}  {'ok' if ok else 'FAIL'}")
    print(f"\n{len(ROWS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
