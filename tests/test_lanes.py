"""Lane plans: contiguous, ordered, flagged, identical on every worker, different per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from raydrive.data.lanes import LaneConfig, plan_epoch, scene_chunks

SCENES = [f"s{i}" for i in range(7) for _ in range(10 + i)]  # 7 scenes of 10..16 frames
TIMES = np.arange(len(SCENES)) * 500_000


def chunks(n=2):
    return scene_chunks(SCENES, TIMES, n)


def test_chunks_split_each_scene_in_time_order():
    cs = chunks(2)
    assert len(cs) == 14 and sum(len(c) for c in cs) == len(SCENES)
    for c in cs:
        assert len({SCENES[i] for i in c}) == 1 and np.all(np.diff(c) == 1)


@pytest.mark.parametrize("world,batch", [(2, 2), (1, 3), (4, 1)])
def test_temporal_invariants(world, batch):
    cfg = LaneConfig(seq_split_num=2, seed=5)
    plan = plan_epoch(chunks(), world, batch, epoch=0, cfg=cfg)
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
    a, b = plan_epoch(chunks(), 2, 2, 0, cfg), plan_epoch(chunks(), 2, 2, 0, cfg)
    assert np.array_equal(a.frame, b.frame) and np.array_equal(a.aug_seed, b.aug_seed)
    c = plan_epoch(chunks(), 2, 2, 1, cfg)
    assert not np.array_equal(a.frame, c.frame)
    d = plan_epoch(chunks(), 2, 2, 0, LaneConfig(seed=2))
    assert not np.array_equal(a.frame, d.frame)


def test_skip_and_flip_follow_the_sampler():
    cfg = LaneConfig(seed=0, skip_prob=0.5, flip_prob=1.0)
    plan = plan_epoch(chunks(), 1, 2, 0, cfg)
    diffs = np.diff(plan.frame[0, :, 0])[~plan.seq_start[0, 1:, 0]]
    assert np.all((diffs == -1) | (diffs == -2)) and np.any(diffs == -2)  # reversed, with skips


def test_non_temporal_is_a_permutation_shard():
    plan = plan_epoch(chunks(), 2, 3, 0, LaneConfig(temporal=False, seed=0))
    seen = plan.frame.reshape(-1)
    assert len(set(seen.tolist())) == len(seen) and plan.seq_start.all()


def test_resume_slices_the_plan():
    plan = plan_epoch(chunks(), 2, 2, 3, LaneConfig())
    full, tail = plan.rows(1), plan.rows(1, start_step=5)
    assert np.array_equal(full["frame"][5 * 2 :], tail["frame"]) and tail["step"][0] == 5
