"""Ray Data pipeline vs a plain torch DataLoader doing the same per-frame work, side by side.

Both paths run Sparse4D's frame mapper (`raydrive/models/sparse4d/mapper.py`: JPEG decode,
resize/crop/flip/rotate folded into the projections, photometric distortion, normalisation, BEV
augmentation, depth points) on the same planned rows, with the same number of parallel workers on
the same cores. Prints time to first batch, steady samples/s (one sample = one 6-camera frame) and
the Ray/DataLoader ratio.

    python benchmarks/data_pipeline.py                 # embedded default set, 256x704 outputs
    python benchmarks/data_pipeline.py --prepared P --batch-size 2 --workers 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _time_batches(batches) -> tuple[float, float, int]:
    """(seconds to the first batch, samples/s after it, samples) for an iterable of batches."""
    t0 = time.perf_counter()
    first, n, n_first = None, 0, 0
    for batch in batches:
        n += len(batch["token"])
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    return first - t0, (n - n_first) / max(end - first, 1e-9), n


def run_ray(pipe, args) -> tuple[float, float, int]:
    return _time_batches(pipe.stream(0, 0, 0, pipe.steps_per_epoch()))


class _PlannedFrames:
    """torch Dataset over the same planned rows, one frame per item."""

    def __init__(self, rows, mapper):
        self.rows, self.mapper = rows, mapper

    def __len__(self):
        return self.rows.num_rows

    def __getitem__(self, i):
        from raydrive.data.pipeline import arrow_to_numpy_batch, map_block

        return map_block(arrow_to_numpy_batch(self.rows.slice(i, 1)), self.mapper)


def _collate(items, mapper):
    from raydrive.data.pipeline import collate

    batch = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if k in mapper.ragged:
            obj = np.empty(len(vals), dtype=object)
            obj[:] = [v[0] for v in vals]
            batch[k] = obj
        else:
            batch[k] = np.concatenate(vals)
    return collate(batch, mapper)


def run_dataloader(pipe, args) -> tuple[float, float, int]:
    import functools

    from torch.utils.data import DataLoader

    rows = pipe.rows(epoch=0, rank=0)
    loader = DataLoader(
        _PlannedFrames(rows, pipe.mapper),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        collate_fn=functools.partial(_collate, mapper=pipe.mapper),
        prefetch_factor=2,
        persistent_workers=False,
    )
    return _time_batches(loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", help="prepared folder (default: the embedded synthetic set)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel decode workers on each side")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=704)
    args = p.parse_args()

    import ray

    from raydrive.config import Batching
    from raydrive.data.pipeline import FramePipeline, PipelineConfig
    from raydrive.models.sparse4d.mapper import Sparse4DMapper
    from raydrive.trainers import get_spec

    prepared = args.prepared
    if prepared is None:
        from raydrive.data.default import ensure_default_data

        prepared = str(ensure_default_data()[1])
    train_cfg = get_spec("sparse4d").config("full")  # upstream augmentation, photometric step included
    train_cfg.data.prepared, train_cfg.model.image_hw = prepared, (args.height, args.width)
    b = args.batch_size
    pipe = FramePipeline(
        PipelineConfig(prepared=prepared, batching=Batching(1, b, 1, b)), Sparse4DMapper(train_cfg, True)
    )
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    results = {}
    # DataLoader first, then Ray, then both again: the second round is the one reported (warm caches).
    for name, fn in (
        ("DataLoader", run_dataloader),
        ("Ray Data", run_ray),
        ("DataLoader", run_dataloader),
        ("Ray Data", run_ray),
    ):
        results[name] = fn(pipe, args)
    ray.shutdown()

    width = max(len(k) for k in results)
    print(
        f"\nframes: {results['Ray Data'][2]} (6 cameras each, {args.height}x{args.width} out), "
        f"batch {args.batch_size}, "
        f"{args.workers} decode workers each, {os.cpu_count()} cores"
    )
    print(f"{'loader':<{width}}  {'first batch (s)':>15}  {'samples/s':>10}")
    for name, (first, rate, _) in results.items():
        print(f"{name:<{width}}  {first:>15.2f}  {rate:>10.2f}")
    ray_first, ray_rate, _ = results["Ray Data"]
    dl_first, dl_rate, _ = results["DataLoader"]
    print(
        f"ratio Ray Data / DataLoader: samples/s {ray_rate / dl_rate:.2f}x, "
        f"time to first batch {ray_first / dl_first:.2f}x"
    )


if __name__ == "__main__":
    main()
