"""Sparse4D eval decoding and tracking ids as upstream (HorizonRobotics/Sparse4D `detection3d/decoder.py`
SparseBox3DDecoder with instance ids, `instance_bank.py` get_instance_id / update_instance_id), and the
temporal state round trip of the model protocol. CPU, small preset, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydrive.models.sparse4d.blocks import CNS
from raydrive.models.sparse4d.head import Sparse4DHead
from raydrive.models.sparse4d.model import Sparse4D, Sparse4DConfig
from raydrive.models.sparse4d.presets import small


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_decode(cls, box, quality, ids, num_output):
    """Upstream's decoding rules with instance ids, in numpy: each query's best class; the top queries by
    that score; times sigmoid(centerness); sorted descending; boxes x, y, z, exp(size), yaw, vx, vy."""
    out = []
    for c, b, q, i in zip(cls, box, quality, ids):
        prob = _sigmoid(c.astype(np.float64))
        best, label = prob.max(-1), prob.argmax(-1)
        top = np.argsort(-best, kind="stable")[:num_output]
        score = best[top] * _sigmoid(q[top, CNS].astype(np.float64))
        top = top[np.argsort(-score, kind="stable")]
        sel = b[top]
        boxes = np.concatenate(
            [sel[:, :3], np.exp(sel[:, 3:6]), np.arctan2(sel[:, 6], sel[:, 7])[:, None], sel[:, 8:10]], axis=1
        )
        out.append({"boxes": boxes, "scores": np.sort(score)[::-1], "labels": label[top], "instance_ids": i[top]})
    return out


def head() -> Sparse4DHead:
    return Sparse4DHead(small().model)


def _head_outputs(bs=2, n=60, num_cls=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(bs, n, num_cls, generator=g) * 3
    box = torch.randn(bs, n, 11, generator=g)
    quality = torch.randn(bs, n, 2, generator=g)
    ids = torch.stack([torch.randperm(1000, generator=g)[:n] for _ in range(bs)])
    ids[:, ::7] = -1
    return {"classification": [None, cls], "prediction": [box + 1, box], "quality": [None, quality], "instance_id": ids}


@pytest.mark.parametrize("num_output", [25, 60, 300])
def test_decode_matches_upstream_rules(num_output):
    out = _head_outputs()
    got = head().decode(out, num_output)
    cls, box, quality = out["classification"][-1], out["prediction"][-1], out["quality"][-1]
    ref = reference_decode(cls.numpy(), box.numpy(), quality.numpy(), out["instance_id"].numpy(), num_output)
    for g, r in zip(got, ref):
        n = min(num_output, 60)
        assert g["boxes"].shape == (n, 9) and g["boxes"].dtype == torch.float32
        assert g["scores"].dtype == torch.float32
        assert g["labels"].dtype == torch.int64 and g["instance_ids"].dtype == torch.int64
        np.testing.assert_array_equal(g["labels"].numpy(), r["labels"])
        np.testing.assert_array_equal(g["instance_ids"].numpy(), r["instance_ids"])
        np.testing.assert_allclose(g["scores"].numpy(), r["scores"], rtol=1e-6)
        np.testing.assert_allclose(g["boxes"].numpy(), r["boxes"], rtol=1e-5, atol=1e-6)


def test_decode_gives_one_box_per_query_with_its_best_class():
    """Query 0 is the best candidate for two classes: upstream (with ids) decodes it once, labelled with
    its best class; ranking (query, class) pairs, as raydrive used to, would decode it twice on top."""
    n, num_cls = 8, 10
    cls = torch.full((1, n, num_cls), -6.0)
    cls[0, 0, 3], cls[0, 0, 7] = 5.0, 4.9
    cls[0, 1:, 0] = torch.linspace(2.0, 0.0, n - 1)
    box = torch.randn(1, n, 11, generator=torch.Generator().manual_seed(1))
    out = {
        "classification": [cls],
        "prediction": [box],
        "quality": [torch.zeros(1, n, 2)],
        "instance_id": torch.arange(n)[None] + 10,
    }
    got = head().decode(out, num_output=3)[0]
    assert got["instance_ids"].tolist() == [10, 11, 12]
    assert got["labels"].tolist() == [3, 0, 0]
    # what the (query, class) ranking would have chosen: query 0 twice
    pairs = cls.sigmoid().flatten(1).topk(3, dim=1).indices[0]
    assert (pairs // num_cls).tolist() == [0, 0, 1]
    # no ids in the head's output (a train-mode output): the same boxes, ids -1
    del out["instance_id"]
    no_ids = head().decode(out, num_output=3)[0]
    assert no_ids["instance_ids"].tolist() == [-1, -1, -1]
    torch.testing.assert_close(no_ids["boxes"], got["boxes"])


# ---------------------------------------------------------------------------------------------------------------
# The small model in eval: tracking ids across frames, slot and full resets, temporal state round trip.


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = small().model
    rng = np.random.default_rng(0)
    anchor = np.zeros((cfg.num_anchor, 11), np.float32)
    anchor[:, :2] = rng.uniform(-30, 30, (cfg.num_anchor, 2))
    anchor[:, 3:6] = np.log(rng.uniform(0.5, 4.0, (cfg.num_anchor, 3)))
    yaw = rng.uniform(-np.pi, np.pi, cfg.num_anchor)
    anchor[:, 6], anchor[:, 7] = np.sin(yaw), np.cos(yaw)
    m = Sparse4D(cfg, anchor).eval()
    captured = []
    decode = m.head.decode
    m.head.decode = lambda out, num_output: captured.append(out) or decode(out, num_output)
    m.captured = captured  # the head's raw outputs, per predict call
    return m


def _frame(cfg: Sparse4DConfig, t: float, seed: int = 0, bs: int = 1) -> dict:
    h, w = cfg.image_hw
    proj = torch.eye(4).repeat(bs, 6, 1, 1)
    proj[..., 0, 0] = proj[..., 1, 1] = 100.0
    proj[..., 0, 2], proj[..., 1, 2] = w / 2, h / 2
    eye = torch.eye(4, dtype=torch.float64).repeat(bs, 1, 1)
    return {
        "img": torch.randn(bs, 6, 3, h, w, generator=torch.Generator().manual_seed(seed)),
        "projection_mat": proj,
        "image_wh": torch.tensor([w, h]).repeat(bs, 6, 1).float(),
        "T_global": eye,
        "T_global_inv": eye.clone(),
        "timestamp": torch.full((bs,), t, dtype=torch.float64),
    }


def test_tracking_ids_follow_the_cached_instances(model):
    cfg, bank = model.cfg, model.head.instance_bank
    k = cfg.num_temp_instances
    model.reset_state()
    seen: set[int] = set()
    prev_cached, prev_decoded = None, set()
    for step in range(3):
        (pred,) = model.predict(_frame(cfg, 0.5 * step))
        ids = model.captured[-1]["instance_id"][0]
        assert len(set(ids.tolist())) == cfg.num_anchor and (ids >= 0).all()
        if step == 0:
            assert ids.tolist() == list(range(cfg.num_anchor))
            assert bank.mask is None
        else:
            assert bank.mask.tolist() == [True]
            # the temporal queries lead the query set and carry the ids cached at the previous frame
            assert ids[:k].tolist() == prev_cached
            # every other query is new: the next ids of the counter, in order
            assert ids[k:].tolist() == list(range(max(seen) + 1, max(seen) + 1 + cfg.num_anchor - k))
            # decoded boxes from temporal queries report ids decoded at the previous frame; the others are new
            position = {i: p for p, i in enumerate(ids.tolist())}
            decoded = pred["instance_ids"].tolist()
            assert any(position[i] < k for i in decoded)
            for i in decoded:
                assert i in prev_decoded if position[i] < k else i > max(seen)
        assert len(pred["instance_ids"]) == min(cfg.decode_top_k, cfg.num_anchor)
        assert set(pred["instance_ids"].tolist()) <= set(ids.tolist())
        prev_decoded = set(pred["instance_ids"].tolist())
        # the cache keeps the ids of the instances it keeps (top temp_confidence), -1 behind them
        kept = torch.topk(bank.temp_confidence, k, dim=1).indices[0]
        assert bank.instance_id[0, :k].tolist() == ids[kept].tolist()
        assert (bank.instance_id[0, k:] == -1).all()
        prev_cached = bank.instance_id[0, :k].tolist()
        seen |= set(ids.tolist())
        assert int(bank.prev_id) == max(seen) + 1

    # this slot starts a new sequence: its cache is ignored and every query gets a new id
    model.reset_state(torch.tensor([True]))
    model.predict(_frame(cfg, 1.5))
    ids = model.captured[-1]["instance_id"][0]
    assert bank.mask.tolist() == [False]
    assert ids.tolist() == list(range(max(seen) + 1, max(seen) + 1 + cfg.num_anchor))
    # the slot reset is used once: the next frame tracks again
    cached = bank.instance_id[0, :k].tolist()
    model.predict(_frame(cfg, 2.0))
    assert bank.mask.tolist() == [True] and model.captured[-1]["instance_id"][0, :k].tolist() == cached

    # a full reset restarts the counter
    model.reset_state()
    assert bank.prev_id == 0 and bank.instance_id is None and bank.cached_anchor is None
    model.predict(_frame(cfg, 2.5))
    assert model.captured[-1]["instance_id"][0].tolist() == list(range(cfg.num_anchor))


def test_new_ids_are_numbered_across_the_batch_in_order(model):
    cfg = model.cfg
    model.reset_state()
    model.predict(_frame(cfg, 0.0, bs=2))
    ids = model.captured[-1]["instance_id"]
    assert ids.flatten().tolist() == list(range(2 * cfg.num_anchor))
    model.reset_state(torch.tensor([False, True]))
    model.predict(_frame(cfg, 0.5, bs=2))
    ids2 = model.captured[-1]["instance_id"]
    k = cfg.num_temp_instances
    assert ids2[1].tolist() == list(
        range(2 * cfg.num_anchor + cfg.num_anchor - k, 3 * cfg.num_anchor + cfg.num_anchor - k)
    )
    assert set(ids2[0, :k].tolist()) <= set(ids[0].tolist())


def _same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_temporal_state_round_trip_gives_identical_predictions(model):
    cfg = model.cfg
    model.reset_state()
    model.predict(_frame(cfg, 0.0, seed=1))
    model.predict(_frame(cfg, 0.5, seed=2))
    model.reset_state(torch.tensor([False]))  # a pending slot reset is part of the state too
    state = model.temporal_state()
    assert {"feature", "anchor", "confidence", "temp_confidence", "timestamp", "T_global", "instance_id"} <= set(state)
    assert state["prev_id"].dtype == torch.int64 and "seq_reset" in state
    frozen = {k: v.clone() for k, v in state.items()}
    first = [model.predict(_frame(cfg, 1.0 + 0.5 * i, seed=3 + i)) for i in range(2)]
    # later frames did not change the held state in place
    for key, value in frozen.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    model.load_temporal_state(state)
    again = [model.predict(_frame(cfg, 1.0 + 0.5 * i, seed=3 + i)) for i in range(2)]
    for a, b in zip(first, again):
        _same(a, b)
    assert again[0][0]["instance_ids"].max() >= int(state["prev_id"])  # continues the counter

    # an empty state is a full reset
    model.reset_state()
    fresh = model.predict(_frame(cfg, 0.0, seed=1))
    model.load_temporal_state({})
    assert model.temporal_state().keys() == {"prev_id"} and int(model.temporal_state()["prev_id"]) == 0
    _same(model.predict(_frame(cfg, 0.0, seed=1)), fresh)
