"""Lane plans: contiguous, ordered, flagged, identical on every worker, different per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from raydrive.config import Batching
from raydrive.data.lanes import LaneConfig, eval_plan, offset_frames, plan_epoch, scene_chunks

SCENES = [f"s{i}" for i in range(7) for _ in range(10 + i)]  # 7 scenes of 10..16 frames
TIMES = np.arange(len(SCENES)) * 500_000


def chunks(n=2):
    return scene_chunks(SCENES, TIMES, n)


def bt(world, batch, accum=1):
    return Batching(world, batch, accum, world * batch * accum)


def test_chunks_split_each_scene_in_time_order():
    cs = chunks(2)
    assert len(cs) == 14 and sum(len(c) for c in cs) == len(SCENES)
    for c in cs:
        assert len({SCENES[i] for i in c}) == 1 and np.all(np.diff(c) == 1)


@pytest.mark.parametrize("world,batch", [(2, 2), (1, 3), (4, 1)])
def test_temporal_invariants(world, batch):
    cfg = LaneConfig(seq_split_num=2, seed=5)
    plan = plan_epoch(chunks(), bt(world, batch), epoch=0, cfg=cfg)
    assert plan.frame.shape == (world, len(SCENES) // (world * batch), batch)
    for r in range(world):
        for b in range(batch):
            lane, starts = plan.frame[r, :, b], plan.seq_start[r, :, b]
            assert starts[0]
            for s in range(1, len(lane)):
                if not starts[s]:  # inside a sequence: the next frame of the same scene
                    assert lane[s] == lane[s - 1] + 1 and SCENES[lane[s]] == SCENES[lane[s - 1]]
                    assert plan.aug_seed[r, s, b] == plan.aug_seed[r, s - 1, b]
                    assert plan.seq_id[r, s, b] == plan.seq_id[r, s - 1, b]
                else:
                    assert plan.seq_id[r, s, b] != plan.seq_id[r, s - 1, b]


def test_same_plan_everywhere_and_new_plan_per_epoch():
    cfg = LaneConfig(seed=1)
    a, b = plan_epoch(chunks(), bt(2, 2), 0, cfg), plan_epoch(chunks(), bt(2, 2), 0, cfg)
    assert np.array_equal(a.frame, b.frame) and np.array_equal(a.aug_seed, b.aug_seed)
    c = plan_epoch(chunks(), bt(2, 2), 1, cfg)
    assert not np.array_equal(a.frame, c.frame)
    d = plan_epoch(chunks(), bt(2, 2), 0, LaneConfig(seed=2))
    assert not np.array_equal(a.frame, d.frame)


def test_skip_and_flip_follow_the_sampler():
    cfg = LaneConfig(seed=0, skip_prob=0.5, reverse_prob=1.0)
    plan = plan_epoch(chunks(), bt(1, 2), 0, cfg)
    diffs = np.diff(plan.frame[0, :, 0])[~plan.seq_start[0, 1:, 0]]
    assert np.all((diffs == -1) | (diffs == -2)) and np.any(diffs == -2)  # reversed, with skips


def test_non_temporal_is_a_permutation_shard():
    plan = plan_epoch(chunks(), bt(2, 3), 0, LaneConfig(temporal=False, seed=0))
    seen = plan.frame.reshape(-1)
    assert len(set(seen.tolist())) == len(seen) and plan.seq_start.all()


def test_resume_slices_the_plan():
    plan = plan_epoch(chunks(), bt(2, 2), 3, LaneConfig())
    full, tail = plan.rows(1), plan.rows(1, start_step=5)
    assert np.array_equal(full["frame"][5 * 2 :], tail["frame"]) and tail["step"][0] == 5


@pytest.mark.parametrize("temporal", [True, False])
def test_global_slots_do_not_depend_on_the_worker_count(temporal):
    """Global slot g sees the same frames whether it is worker g's slot or a micro-batch slot of one
    worker: 2 workers x batch 2, 1 worker x batch 2 x 2 accumulation, 4 workers x batch 1."""
    cfg = LaneConfig(seed=3, temporal=temporal, skip_prob=0.3)
    plans = [plan_epoch(chunks(), b, 0, cfg) for b in (bt(2, 2), bt(1, 2, 2), bt(4, 1), bt(1, 1, 4))]
    by_slot = [p.frame.transpose(1, 0, 2).reshape(p.steps, -1) for p in plans]  # (steps, global slot)
    for other in by_slot[1:]:
        assert np.array_equal(by_slot[0], other)
    rows = plans[1].rows(0)
    assert rows["micro"][:4].tolist() == [0, 0, 1, 1] and rows["slot"][:4].tolist() == [0, 1, 2, 3]


def test_eval_plan_covers_every_frame_once():
    scenes = scene_chunks(SCENES, TIMES, 1)
    parts = [eval_plan(scenes, r, 3) for r in range(3)]
    frames = np.concatenate([p["frame"] for p in parts])
    assert sorted(frames.tolist()) == list(range(len(SCENES)))
    assert sum(int(p["seq_start"].sum()) for p in parts) == 7


def test_key_frame_offsets_stay_in_the_scene():
    prev = offset_frames(SCENES, TIMES, -1)
    starts = [i for i in range(len(SCENES)) if i == 0 or SCENES[i] != SCENES[i - 1]]
    for i in range(len(SCENES)):
        assert prev[i] == (i if i in starts else i - 1)  # the current frame again at a scene start
    nxt = offset_frames(SCENES, TIMES, 1)
    assert all(SCENES[nxt[i]] == SCENES[i] for i in range(len(SCENES)))
