"""What every model's frame mapper does the same way: read a camera image with the errors a user can
act on, turn ragged per-frame values into arrays, and stack per-frame dicts into a batch block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydrive.data.infos import DataError


def read_camera_image(path: Path, width: int, height: int, sample: str, draft_size: tuple[int, int]):
    """The image as a loaded RGB PIL image, checked against the size its info record gives.

    `draft_size` lets libjpeg decode at a reduced DCT scale that is still >= the resize target: several
    times cheaper at 256x704 from 1600x900; callers resize to absolute dimensions, so their
    augmentation matrices (in original pixels) are unchanged."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size != (width, height):
                raise DataError(
                    f"image {path} is {im.size[0]}x{im.size[1]}, its info record says {width}x{height}; "
                    f"re-run `raydrive prepare`"
                )
            im.draft("RGB", draft_size)
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(
            f"missing image {path} (sample {sample}); check --dataroot or the mount of the nuScenes tree on this node"
        ) from None
    except OSError as e:
        raise DataError(f"cannot decode image {path} (sample {sample}): {e}") from None


def stack_ragged(values, inner: tuple[int, ...], dtype) -> np.ndarray:
    """One frame's ragged column (a sequence of per-object values) as an (N, *inner) array."""
    arr = np.array([np.asarray(v, dtype=dtype) for v in values], dtype=dtype) if len(values) else np.zeros(0, dtype)
    return arr.reshape(-1, *inner) if inner else arr.reshape(-1)


def frames_to_block(frames: list[dict[str, np.ndarray]], ragged) -> dict[str, np.ndarray]:
    """Per-frame dicts -> one block: stacked arrays, and object arrays for the `ragged` keys."""
    out = {}
    for key in frames[0] if frames else ():
        values = [f[key] for f in frames]
        if key in ragged:
            obj = np.empty(len(values), dtype=object)
            obj[:] = values
            out[key] = obj
        else:
            out[key] = np.stack(values)
    return out
