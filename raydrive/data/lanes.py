"""Temporal lanes: which frame every (worker, batch slot) sees at every step of an epoch.

Sparse4D, SparseDrive and StreamPETR keep temporal state per batch slot inside the model, so each
slot must stream contiguous frames of one scene chunk in time order, and the model must be told
where a new sequence starts. Ray Data's `streaming_split` gives no ordering guarantee, so raydrive
plans the order itself and only asks Ray Data to preserve it.

The plan follows Sparse4D's `GroupInBatchSampler` (`projects/mmdet3d_plugin/datasets/samplers/
group_in_batch_sampler.py`): scenes are cut into `seq_split_num` chunks; there are G = global batch
slots; an infinite stream of seeded chunk permutations is dealt out so that slot g
takes stream positions g, g + G, g + 2G, ...; a slot plays its chunk frame by frame (optionally
reversed with `reverse_prob`, optionally skipping a frame with `skip_prob` while more than one is left)
and then moves on. raydrive makes this finite per epoch: every slot gets exactly
`steps = num_frames // G` frames, the stream is re-seeded from (seed, epoch), and a chunk still
running at the end of an epoch is cut (the next epoch starts fresh sequences).

The plan is a pure function of (frames, seed, epoch, global batch): the same for any worker count.
Global slot g belongs to worker g // S, where S = batch_size x accum_steps slots per worker, and
micro-batch (g % S) // batch_size of each optimizer step: so 2 workers x batch 2 and 1 worker x
batch 2 x 2 accumulation steps see the same frames in the same slots. Every worker computes the
same plan and takes its own rows, so no coordination is needed and resuming at (epoch, step) only
slices it. Models without temporal state get a seeded permutation dealt out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydrive.config import Batching


@dataclass(frozen=True)
class LaneConfig:
    temporal: bool = True  # False: a seeded permutation of single frames
    seq_split_num: int = 2  # chunks per scene (Sparse4D / StreamPETR use 2)
    skip_prob: float = 0.0  # Sparse4D trains with 0.5
    reverse_prob: float = 0.0  # play a chunk backwards; Sparse4D trains with 0.1
    seed: int = 0


@dataclass
class Plan:
    """Arrays of shape (world_size, steps, slots per worker); `batch_size` slots make a micro-batch."""

    frame: np.ndarray  # index into the split's records
    seq_start: np.ndarray  # True where this slot starts a new sequence
    seq_id: np.ndarray  # unique per (slot, chunk) within the epoch
    aug_seed: np.ndarray  # augmentation draw, shared by all frames of a sequence
    batch_size: int = 1  # slots per micro-batch

    @property
    def steps(self) -> int:
        return self.frame.shape[1]

    def rows(self, rank: int, start_step: int = 0) -> dict[str, np.ndarray]:
        """This worker's rows in the order it must consume them (step-major, slot-minor)."""
        sl = (rank, slice(start_step, None))
        steps, slots = self.frame[sl].shape
        return {
            "frame": self.frame[sl].reshape(-1),
            "seq_start": self.seq_start[sl].reshape(-1),
            "seq_id": self.seq_id[sl].reshape(-1),
            "aug_seed": self.aug_seed[sl].reshape(-1),
            "step": np.repeat(np.arange(start_step, start_step + steps), slots),
            "slot": np.tile(np.arange(slots), steps),
            "micro": np.tile(np.arange(slots) // self.batch_size, steps),
        }


def scene_chunks(scene_tokens: list[str], timestamps: np.ndarray, seq_split_num: int) -> list[np.ndarray]:
    """Frame indices of each chunk, in time order. Frames of a scene are grouped by scene token."""
    if seq_split_num < 1:
        raise ValueError(f"seq_split_num must be >= 1, got {seq_split_num}")
    by_scene: dict[str, list[int]] = {}
    for i, tok in enumerate(scene_tokens):
        by_scene.setdefault(tok, []).append(i)
    chunks = []
    for idx in by_scene.values():
        idx = np.array(sorted(idx, key=lambda i: timestamps[i]))
        parts = min(seq_split_num, len(idx))
        chunks += [c for c in np.array_split(idx, parts) if len(c)]
    return chunks


def plan_epoch(chunks: list[np.ndarray], batching: Batching, epoch: int, cfg: LaneConfig) -> Plan:
    num_frames = int(sum(len(c) for c in chunks))
    slots, world_size, per_worker = batching.global_batch, batching.world_size, batching.slots_per_worker
    if num_frames == 0:
        raise ValueError("the split has no frames: nothing to plan")
    steps = max(1, num_frames // slots)
    shape = (world_size, steps, per_worker)
    frame = np.zeros(shape, dtype=np.int64)
    seq_start = np.zeros(shape, dtype=bool)
    seq_id = np.zeros(shape, dtype=np.int64)
    aug_seed = np.zeros(shape, dtype=np.int64)

    if not cfg.temporal:
        rng = np.random.default_rng([cfg.seed, epoch])
        all_frames = np.concatenate(chunks)
        order = np.concatenate([rng.permutation(all_frames) for _ in range(-(-steps * slots // num_frames))])
        dealt = order[: steps * slots].reshape(steps, world_size, per_worker).transpose(1, 0, 2)
        frame[:] = dealt
        seq_start[:] = True
        seq_id[:] = np.arange(frame.size).reshape(shape)
        aug_seed[:] = rng.integers(0, 2**62, size=shape)
        return Plan(frame, seq_start, seq_id, aug_seed, batching.batch_size)

    stream_rng = np.random.default_rng([cfg.seed, epoch, 0])
    stream: list[int] = []

    def chunk_at(pos: int) -> int:
        while len(stream) <= pos:
            stream.extend(stream_rng.permutation(len(chunks)).tolist())
        return stream[pos]

    for g in range(slots):
        rank, b = divmod(g, per_worker)
        rng = np.random.default_rng([cfg.seed, epoch, 1, g])
        filled, k = 0, 0
        while filled < steps:
            frames = chunks[chunk_at(g + k * slots)]
            if rng.uniform() < cfg.reverse_prob:
                frames = frames[::-1]
            seed = int(rng.integers(0, 2**62))
            buf = list(frames)
            first = True
            while buf and filled < steps:
                if cfg.skip_prob > 0 and len(buf) > 1 and rng.uniform() < cfg.skip_prob:
                    buf.pop(0)
                frame[rank, filled, b] = buf.pop(0)
                seq_start[rank, filled, b] = first
                seq_id[rank, filled, b] = g * 1_000_000 + k
                aug_seed[rank, filled, b] = seed
                first = False
                filled += 1
            k += 1
    return Plan(frame, seq_start, seq_id, aug_seed, batching.batch_size)


def eval_plan(chunks: list[np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    """Every frame exactly once, for evaluation: scene k goes to rank k % world_size, its frames in time
    order in one slot, a sequence start on each scene's first frame (chunks of whole scenes)."""
    mine = [c for k, c in enumerate(chunks) if k % world_size == rank]
    idx = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([np.arange(len(c)) == 0 for c in mine]) if mine else np.zeros(0, dtype=bool)
    n = len(idx)
    zeros = np.zeros(n, np.int64)
    return {
        "frame": idx,
        "seq_start": starts,
        "seq_id": np.cumsum(starts),
        "aug_seed": zeros,
        "step": np.arange(n),
        "slot": zeros,
        "micro": zeros,
    }


def offset_frames(scene_tokens: list[str], timestamps: np.ndarray, offset: int) -> np.ndarray:
    """For every frame, the index of the key frame `offset` steps away in its scene, clamped to the
    scene (the current frame is reused at a scene start, as BEVDepth's dataset does)."""
    out = np.arange(len(scene_tokens))
    for frames in scene_chunks(scene_tokens, timestamps, 1):
        pos = np.clip(np.arange(len(frames)) + offset, 0, len(frames) - 1)
        out[frames] = frames[pos]
    return out
