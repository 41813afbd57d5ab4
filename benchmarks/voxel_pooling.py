"""BEVDepth voxel pooling variants side by side: forward + backward time and peak memory.

Full-model sizes per sample: 6 cameras x 112 depth bins x 16 x 44 feature pixels (473k frustum points)
x 80 channels pooled into a 128 x 128 x 1 grid. The point cloud is BEVDepth's frustum (6 cameras 60
degrees apart, depths 2-58 m in 0.5 m bins, 51.2 m / 0.8 m cells, z in [-5, 3) m), so cells near the ego
collect many points and far points fall off the grid, as in training.

Variants:
  reference  raydrive's op (`voxel_pooling_reference`): one index_add_ over all points, dropped points
             spread over spare rows; custom backward = one index_select gather
  autograd   the naive port: compact the kept points (boolean index), index_add_, autograd backward
  sorted     sort points by cell, segment_reduce('sum') per cell, autograd backward
  fused      mx_driving.npu_voxel_pooling_train (only on an Ascend NPU)

Each (variant, batch) runs in a fresh subprocess so that the peak it reports is its own: on CUDA / NPU
the allocator's peak above the inputs, on CPU the growth of the process' peak RSS above the inputs.

    python benchmarks/voxel_pooling.py                   # CPU here: B=1, all variants
    python benchmarks/voxel_pooling.py --batch 1 4 8     # on a GPU machine: the device is picked up
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

VARIANTS = ("reference", "autograd", "sorted", "fused")
N_CAMS, DEPTH, FH, FW, C = 6, 112, 16, 44, 80
GRID = (128, 128, 1)


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():
            return torch.device("npu")
    except ImportError:
        pass
    return torch.device("cpu")


def frustum_cells(batch: int, seed: int = 0):
    """(B, 6, 112, 16, 44, 3) int32 cell indices, truncated toward zero as BEVDepth's `.int()` does."""
    import torch

    g = torch.Generator().manual_seed(seed)
    depth = torch.arange(DEPTH, dtype=torch.float32) * 0.5 + 2.0  # d_bound [2, 58, 0.5]
    u = (torch.arange(FW, dtype=torch.float32) + 0.5) / FW - 0.5  # across a ~70 degree field of view
    v = (torch.arange(FH, dtype=torch.float32) + 0.5) / FH - 0.5  # and ~30 degrees vertically
    out = []
    for _ in range(batch):
        yaw0 = float(torch.rand((), generator=g)) * 2 * math.pi  # each sample rotated (BEV augmentation)
        cams = []
        for cam in range(N_CAMS):
            yaw = yaw0 + cam * math.pi / 3 + u * math.radians(70)  # (W,)
            pitch = v * math.radians(30)  # (H,)
            d = depth[:, None, None]
            x = d * torch.cos(yaw)[None, None, :] * torch.ones(FH)[None, :, None]
            y = d * torch.sin(yaw)[None, None, :] * torch.ones(FH)[None, :, None]
            z = 1.6 - d * torch.tan(pitch)[None, :, None] * torch.ones(FW)[None, None, :]
            cams.append(torch.stack([x, y, z], dim=-1))  # (D, H, W, 3)
        out.append(torch.stack(cams))
    pts = torch.stack(out)
    lower = torch.tensor([-51.2, -51.2, -5.0])  # voxel_coord - voxel_size / 2 in BEVDepth's config
    size = torch.tensor([0.8, 0.8, 8.0])
    return ((pts - lower) / size).int()


def _variant_fn(name: str):
    import torch

    from raydrive.ops.voxel_pooling import voxel_pooling, voxel_pooling_reference

    nx, ny, nz = GRID

    def autograd(geom, feats, grid):
        b, c = feats.shape[0], feats.shape[-1]
        g = geom.reshape(b, -1, 3).long()
        kept = ((g >= 0) & (g < torch.tensor(grid, device=g.device))).all(-1)
        rows = (torch.arange(b, device=g.device)[:, None] * ny + g[..., 1]) * nx + g[..., 0]
        src = feats.reshape(b, -1, c)[kept].float()
        out = torch.zeros(b * ny * nx, c, device=feats.device).index_add(0, rows[kept], src)
        return out.view(b, ny, nx, c).permute(0, 3, 1, 2).to(feats.dtype)

    def sorted_segments(geom, feats, grid):
        b, c = feats.shape[0], feats.shape[-1]
        g = geom.reshape(b, -1, 3).long()
        kept = ((g >= 0) & (g < torch.tensor(grid, device=g.device))).all(-1)
        rows = (torch.arange(b, device=g.device)[:, None] * ny + g[..., 1]) * nx + g[..., 0]
        rows = torch.where(kept, rows, b * ny * nx).reshape(-1)  # dropped points sort into one last segment
        rows, order = torch.sort(rows)
        src = feats.reshape(-1, c).float().index_select(0, order)
        lengths = torch.bincount(rows, minlength=b * ny * nx + 1)
        out = torch.segment_reduce(src, "sum", lengths=lengths, axis=0)[: b * ny * nx]
        return out.view(b, ny, nx, c).permute(0, 3, 1, 2).to(feats.dtype)

    return {
        "reference": voxel_pooling_reference,
        "autograd": autograd,
        "sorted": sorted_segments,
        "fused": lambda geom, feats, grid: voxel_pooling(geom, feats, grid, use_fused=True),
    }[name]


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def child(args) -> dict:
    """One variant at one batch size, in this process: timings and peak memory as a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    geom = frustum_cells(args.batch).to(device)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(*geom.shape[:-1], C, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    fn = _variant_fn(args.child)
    grad_out = torch.randn(args.batch, C, GRID[1], GRID[0], generator=g).to(device=device, dtype=dtype)
    kept = float(((geom >= 0) & (geom < torch.tensor(GRID, device=device))).all(-1).float().mean())

    def step():
        feats.grad = None
        out = fn(geom, feats, GRID)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad_out)
        _sync(device)
        return out, t1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)
        base = torch.npu.memory_allocated(device)
    else:
        base = _peak_bytes(device)  # the high-water mark so far: inputs, no pooling yet
    out, _ = step()  # warm-up (and the result for the cross-check)
    result = out.detach().float().cpu()
    del out
    fwd, bwd = [], []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        _, t1 = step()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    peak = _peak_bytes(device) - base
    return {
        "variant": args.child,
        "batch": args.batch,
        "device": str(device),
        "kept": kept,
        "fwd_ms": 1e3 * sorted(fwd)[len(fwd) // 2],
        "bwd_ms": 1e3 * sorted(bwd)[len(bwd) // 2],
        "peak_mib": peak / 2**20,
        "checksum": float(result.double().abs().sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, help="default: all that can run here")
    p.add_argument("--device", default=None, help="cpu / cuda / npu (default: the accelerator if present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes (median reported)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.batch = args.batch[0]
        print(json.dumps(child(args)))
        return

    device = _device(args.device)
    variants = args.variants or [v for v in VARIANTS if v != "fused" or device.type == "npu"]
    print(
        f"voxel pooling, {device}, {args.dtype}: per sample {N_CAMS}x{DEPTH}x{FH}x{FW} points x {C} channels "
        f"-> {GRID[0]}x{GRID[1]}x{GRID[2]} grid; median of {args.repeats}, {args.threads} CPU threads"
    )
    rows = []
    for b in args.batch:
        for v in variants:
            cmd = [sys.executable, __file__, "--child", v, "--batch", str(b), "--dtype", args.dtype]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            if args.device:
                cmd += ["--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {v} B={b}: failed\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    header = ("B", "variant", "kept", "fwd ms", "bwd ms", "total ms", "vs ref", "peak MiB")
    print("{:>3} {:<10} {:>6} {:>9} {:>9} {:>9} {:>7} {:>9}".format(*header))
    for b in args.batch:
        group = [r for r in rows if r["batch"] == b]
        ref = next((r for r in group if r["variant"] == "reference"), None)
        for r in group:
            total = r["fwd_ms"] + r["bwd_ms"]
            ratio = total / (ref["fwd_ms"] + ref["bwd_ms"]) if ref else float("nan")
            same = ""
            if ref and not math.isclose(r["checksum"], ref["checksum"], rel_tol=1e-4):
                same = "  (output differs from reference!)"
            print(
                f"{b:>3} {r['variant']:<10} {r['kept']:>6.1%} {r['fwd_ms']:>9.1f} {r['bwd_ms']:>9.1f} "
                f"{total:>9.1f} {ratio:>6.2f}x {r['peak_mib']:>9.1f}{same}"
            )


if __name__ == "__main__":
    main()
