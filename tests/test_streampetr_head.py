"""StreamPETR 3D head: upstream keys, memory queue through ego poses, slot resets, the DN mask, losses
with gradients, NMS-free decoding, the 3D Hungarian assigner and the 3D position embedding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raydrive.models.streampetr.head import (
    StreamPETRHead,
    denormalize_bbox,
    hungarian_assign_3d,
    nerf_positional_encoding,
    normalize_bbox,
    pos2posemb3d,
)

# upstream key lists (copied from shared/specs/keys)
KEY_FILES = [
    Path(__file__).resolve().parent / "data" / "streampetr_vov99_800.txt",
    Path(__file__).resolve().parent / "data" / "streampetr_r50_704.txt",
]
SMALL = dict(
    in_channels=32,
    embed_dims=32,
    num_query=20,
    memory_len=24,
    topk_proposals=8,
    num_propagated=8,
    depth_num=8,
    num_dn_groups=3,
    num_layers=2,
    num_heads=4,
    ffn_dims=64,
    dropout=0.0,
    max_num=30,
)
N_CAM, H, W, STRIDE = 2, 4, 6, 16

# frozen as upstream (nn.Parameters with requires_grad=False)
FROZEN = {"code_weights", "match_costs", "pc_range", "position_range", "coords_d", "pseudo_reference_points.weight"}


def small_head(**kw) -> StreamPETRHead:
    torch.manual_seed(0)
    return StreamPETRHead(**{**SMALL, **kw})


def pose(yaw: float, tx: float, ty: float) -> torch.Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, -s, 0, tx], [s, c, 0, ty], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)


def cameras() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pinhole cameras at the lidar origin, one looking along +x, one along -x: (lidar2img, intrinsics)."""
    K = torch.eye(4)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2] = 50.0, 55.0, W * STRIDE / 2, H * STRIDE / 2
    cam2lidar = torch.eye(4)
    cam2lidar[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # z forward -> +x, x right -> -y
    back = pose(math.pi, 0, 0).float() @ cam2lidar
    lidar2img = torch.stack([K @ torch.linalg.inv(cam2lidar), K @ torch.linalg.inv(back)])
    return lidar2img, torch.stack([K, K])


def make_batch(B: int, ego: torch.Tensor, t: float, num_gt: list[int] | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lidar2img, intrinsics = cameras()
    num_gt = num_gt if num_gt is not None else [3] * B
    boxes, labels = [], []
    for n in num_gt:
        xyz = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([60.0, 60.0, 4.0])
        size = 1 + 3 * torch.rand(n, 3, generator=g)
        rest = torch.rand(n, 3, generator=g) * 2 - 1
        boxes.append(torch.cat([xyz, size, rest], dim=1))
        labels.append(torch.randint(0, 10, (n,), generator=g))
    return {
        "lidar2img": lidar2img.expand(B, -1, -1, -1).clone(),
        "intrinsics": intrinsics.expand(B, -1, -1, -1).clone(),
        "ego_pose": ego.expand(B, -1, -1).clone(),
        "ego_pose_inv": torch.linalg.inv(ego).expand(B, -1, -1).clone(),
        "timestamp": torch.full((B,), t, dtype=torch.float64),
        "pad_hw": torch.tensor([[H * STRIDE, W * STRIDE]] * B),
        "gt_boxes": boxes,
        "gt_labels": labels,
    }


def feats(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N_CAM, SMALL["in_channels"], H, W, generator=torch.Generator().manual_seed(seed))


def read_keys(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("pts_bbox_head."):
            name, shape = line.split(" ", 1)
            out[name[len("pts_bbox_head.") :]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_keys_and_shapes_match_upstream():
    head = StreamPETRHead()  # the vov / r50 configs' head (identical for both)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    for path in KEY_FILES:
        expected = read_keys(path)
        assert len(ours) == len(expected) == 251
        assert ours == expected, path.name
    # one shared branch per kind, as upstream; cls prior 0.01; LID depth bins up to 61.2 m
    assert head.cls_branches[0] is head.cls_branches[5] and head.reg_branches[0] is head.reg_branches[5]
    assert torch.allclose(head.cls_branches[3][-1].bias, torch.full((10,), -4.59512), atol=1e-4)
    assert head.coords_d[0] == 1.0 and abs(head.coords_d[-1].item() - (1 + 60.2 * 63 * 64 / (64 * 65))) < 1e-4
    assert not head.pseudo_reference_points.weight.requires_grad


def test_memory_holds_previous_topk_in_the_current_ego_frame():
    head = small_head().eval()
    K, M = 8, 24
    e1, e2 = pose(math.pi / 2, 10.0, 5.0), pose(0.0, 12.0, 5.0)
    b1, b2 = make_batch(1, e1, 100.0), make_batch(1, e2, 100.5)
    with torch.no_grad():
        out1 = head(feats(1, 1), b1)
    score = out1["all_cls_scores"][-1, 0].sigmoid().max(-1).values
    top = score.topk(K).indices
    ref1 = out1["all_bbox_preds"][-1, 0, top, :3].double()  # (K, 3) in frame 1's lidar frame

    state = {k: v.clone() for k, v in head.memory_state().items()}
    assert state["reference_point"].shape == (1, M + K, 3)
    # hand check of one point: frame 1 is rotated 90 deg and at (10, 5): global = (10 - y, 5 + x, z)
    x, y, z = ref1[0].tolist()
    glob = torch.tensor([10 - y, 5 + x, z], dtype=torch.float64)
    assert torch.allclose(state["reference_point"][0, 0], glob, atol=1e-9)
    homo = torch.cat([ref1, torch.ones(K, 1, dtype=torch.float64)], 1)
    assert torch.allclose(state["reference_point"][0, :K], (e1 @ homo.T).T[:, :3], atol=1e-9)
    assert torch.allclose(state["timestamp"][0, :K, 0], torch.full((K,), -100.0, dtype=torch.float64))

    # what frame 2 reads: frame 2 is unrotated at (12, 5), so the point is at (-2 - y, x, z) there
    head._pre_update_memory(b2, 1, torch.device("cpu"))
    here = torch.tensor([-2 - y, x, z], dtype=torch.float64)
    assert torch.allclose(head.memory_reference_point[0, 0], here, atol=1e-9)
    expected = (torch.linalg.inv(e2) @ e1 @ homo.T).T[:, :3]
    assert torch.allclose(head.memory_reference_point[0, :K], expected, atol=1e-9)
    assert head.memory_reference_point.shape == (1, M, 3)  # truncated to memory_len
    assert torch.allclose(head.memory_timestamp[0, :K, 0], torch.full((K,), 0.5, dtype=torch.float64))
    assert torch.allclose(head.memory_egopose[0, 0], torch.linalg.inv(e2) @ e1, atol=1e-12)
    assert torch.equal(head.memory_embedding[0, :K], state["embedding"][0, :K])

    # the full second frame: frame 2's top-k go first, frame 1's move behind them, still global
    head.load_memory_state(state)
    with torch.no_grad():
        head(feats(1, 2), b2)
    after = head.memory_state()
    assert after["reference_point"].shape == (1, M + K, 3)
    assert torch.allclose(after["reference_point"][0, K : 2 * K], state["reference_point"][0, :K], atol=1e-9)
    assert torch.allclose(after["timestamp"][0, K : 2 * K, 0], torch.full((K,), -100.0, dtype=torch.float64))
    assert torch.allclose(after["timestamp"][0, :K, 0], torch.full((K,), -100.5, dtype=torch.float64))


def test_reset_memory_zeroes_exactly_the_given_slots():
    head = small_head().eval()
    with torch.no_grad():
        head(feats(3), make_batch(3, pose(0.3, 1.0, 2.0), 50.0))
    before = {k: v.clone() for k, v in head.memory_state().items()}
    head.reset_memory(torch.tensor([True, False, True]))
    after = head.memory_state()
    for name in ("embedding", "reference_point", "timestamp", "egopose", "velo"):
        assert before[name][[0, 2]].abs().sum() > 0
        assert (after[name][[0, 2]] == 0).all(), name
        assert torch.equal(after[name][1], before[name][1]), name
    assert after["fresh"].tolist() == [True, False, True]

    # at the next frame the reset slots start from the pseudo reference points and identity poses
    head._pre_update_memory(make_batch(3, pose(0.3, 1.5, 2.0), 50.5), 3, torch.device("cpu"))
    lo, hi = head.pc_range[:3], head.pc_range[3:]
    pseudo = (head.pseudo_reference_points.weight * (hi - lo) + lo).double()
    P = SMALL["num_propagated"]
    for slot in (0, 2):
        assert torch.allclose(head.memory_reference_point[slot, :P], pseudo)
        assert (head.memory_reference_point[slot, P:] == 0).all()
        assert torch.equal(head.memory_egopose[slot, :P], torch.eye(4, dtype=torch.float64).expand(P, 4, 4))
    assert not torch.allclose(head.memory_reference_point[1, :P], pseudo)
    assert head.memory_timestamp[1].abs().max() > 0

    head.load_memory_state({})
    assert head.memory_state() == {}


def test_dn_queries_and_attention_mask():
    head = small_head().train()
    batch = make_batch(2, torch.eye(4, dtype=torch.float64), 0.0, num_gt=[2, 3])
    refs, mask, dn = head.prepare_for_dn(2, batch)
    G, single, Q, P, M = 3, 3, 20, 8, 24
    pad = G * single
    assert dn["pad_size"] == pad and dn["num_tgt"] == 5 * G
    assert refs.shape == (2, pad + Q, 3)
    assert mask.shape == (pad + Q + P, pad + Q + M) and mask.dtype == torch.bool
    assert mask[pad:, :pad].all()  # matching and propagated queries never see DN queries
    assert not mask[:, pad:].any()  # everything sees matching queries, propagated ones and memory
    group = torch.arange(pad) // single
    assert torch.equal(mask[:pad, :pad], group[:, None] != group[None, :])  # DN groups isolated
    # the noised centres sit at group * max_gt + j, normalised to [0, 1]; the rest are the learnt refs
    assert torch.equal(refs[:, pad:], head.reference_points.weight.detach().expand(2, -1, -1))
    assert torch.equal(dn["map_known_indice"], torch.tensor([0, 1, 0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6, 7, 8]))
    assert torch.equal(dn["known_bid"], torch.tensor([0, 0, 1, 1, 1] * G))
    placed = refs[dn["known_bid"], dn["map_known_indice"]]
    assert ((placed >= 0) & (placed <= 1)).all()
    assert (refs[0, [2, 5, 8]] == 0).all()  # frame 0 has 2 GT: its third slot of each group is empty padding
    # a centre is never moved by more than half the box size (noise 1.0)
    lo, hi = head.pc_range[:3], head.pc_range[3:]
    moved = placed * (hi - lo) + lo - dn["known_bboxs"][:, :3]
    assert (moved.abs() <= dn["known_bboxs"][:, 3:6] / 2 + 1e-4).all()
    labels = torch.cat(batch["gt_labels"]).repeat(G)
    bg = dn["known_labels"] == 10
    assert torch.equal(dn["known_labels"][~bg], labels[~bg])


def test_losses_finite_with_gradients_to_every_trainable_parameter():
    head = small_head().train()
    e = pose(0.1, 3.0, -2.0)
    head(feats(2, 1), make_batch(2, e, 10.0, num_gt=[3, 0]))  # fills the memory
    out = head(feats(2, 2), make_batch(2, e, 10.5, num_gt=[3, 1], seed=1))
    losses = head.loss(out, make_batch(2, e, 10.5, num_gt=[3, 1], seed=1))
    expected = {"loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox"}
    expected |= {"dn_loss_cls", "dn_loss_bbox", "d0.dn_loss_cls", "d0.dn_loss_bbox"}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        assert value > 0, name
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        if not p.requires_grad:
            assert name in FROZEN, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # an MLN's gamma/beta start with zero weights, so its `reduce` layer gets zero gradient at init
        if ".reduce." not in name:
            assert p.grad.abs().sum() > 0, name


def test_losses_without_any_gt_keep_dn_entries_detached():
    head = small_head().train()
    batch = make_batch(2, torch.eye(4, dtype=torch.float64), 0.0, num_gt=[0, 0])
    out = head(feats(2), batch)
    assert out["dn_mask_dict"] is None
    losses = head.loss(out, batch)
    assert torch.equal(losses["dn_loss_cls"], losses["loss_cls"].detach()) and not losses["dn_loss_cls"].requires_grad
    assert losses["loss_bbox"] == 0 and losses["loss_cls"] > 0


def test_decode_in_range_with_bottom_z():
    head = small_head(post_center_range=(-20.0, -20.0, -10.0, 20.0, 20.0, 10.0)).eval()
    with torch.no_grad():
        out = head(feats(2), make_batch(2, torch.eye(4, dtype=torch.float64), 0.0))
    results = head.decode(out)
    assert len(results) == 2
    cls, boxes = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
    for b, res in enumerate(results):
        k = res["boxes_3d"].shape[0]
        assert 0 < k <= SMALL["max_num"] and res["boxes_3d"].shape == (k, 9)
        assert res["scores_3d"].shape == (k,) and res["labels_3d"].shape == (k,)
        assert (res["scores_3d"][:-1] >= res["scores_3d"][1:]).all()
        assert (res["boxes_3d"][:, :2].abs() <= 20).all()
        # hand decode of the first kept box: z is the bottom, yaw from sin/cos, sizes exp'd
        flat = cls[b].sigmoid().reshape(-1)
        order = flat.argsort(descending=True)
        for idx in order:
            q, label = divmod(int(idx), 10)
            code = boxes[b, q]
            if code[:2].abs().max() <= 20:
                break
        assert int(res["labels_3d"][0]) == label
        want = torch.cat(
            [code[:2], code[2:3] - code[5:6].exp() / 2, code[3:6].exp(), torch.atan2(code[6:7], code[7:8]), code[8:]]
        )
        assert torch.allclose(res["boxes_3d"][0], want, atol=1e-5)
        assert (res["boxes_3d"][:, 2] + res["boxes_3d"][:, 5] / 2 >= -10).all()


def test_hungarian_matches_a_perfect_prediction_to_its_gt():
    g = torch.Generator().manual_seed(3)
    gt = torch.cat(
        [torch.rand(4, 3, generator=g) * 40 - 20, 1 + torch.rand(4, 3, generator=g), torch.rand(4, 3, generator=g)], 1
    )
    labels = torch.tensor([2, 0, 7, 2])
    code = torch.randn(20, 10, generator=g) * 5 + 30  # far from every GT
    logits = torch.full((20, 10), -5.0)
    rows = torch.tensor([13, 3, 17, 8])
    code[rows] = normalize_bbox(gt)
    logits[rows, labels] = 5.0
    weights = torch.tensor([2.0, 2, 1, 1, 1, 1, 1, 1, 1, 1])
    q, j = hungarian_assign_3d(logits, code, gt, labels, weights)
    assert dict(zip(q.tolist(), j.tolist())) == {13: 0, 3: 1, 17: 2, 8: 3}
    assert torch.allclose(denormalize_bbox(normalize_bbox(gt)), gt, atol=1e-6)

    head = small_head()
    loss_cls, loss_bbox = head.loss_single(logits[None], code[None], [gt], [labels])
    assert loss_bbox.abs() < 1e-6 and torch.isfinite(loss_cls)


def test_position_embedding_lifts_each_token_onto_its_pixel_ray():
    head = small_head().eval()
    batch = make_batch(2, torch.eye(4, dtype=torch.float64), 0.0)
    topk = torch.stack([torch.randperm(N_CAM * H * W)[:10] for _ in range(2)])[..., None]  # (B, K, 1)
    pos, cone = head.position_embedding(batch, (2, N_CAM, H, W), topk)
    assert pos.shape == (2, 10, SMALL["embed_dims"]) and cone.shape == (2, 10, 8)
    lo, hi = head.position_range[:3], head.position_range[3:]
    far = cone[..., 2:5] * (hi - lo) + lo  # the point at the last depth bin, lidar frame
    depth = head.coords_d[-1]
    for b in range(2):
        for k, token in enumerate(topk[b, :, 0].tolist()):
            cam, pix = divmod(token, H * W)
            v, u = divmod(pix, W)
            img = batch["lidar2img"][b, cam] @ torch.cat([far[b, k], torch.ones(1)])
            assert torch.allclose(img[:3], torch.tensor([(u * 16 + 8) * depth, (v * 16 + 8) * depth, depth]), rtol=1e-4)
    # upstream's camera-fastest tiling of |fx|, |fy| / 1000 (both cameras share K here)
    assert torch.allclose(cone[..., :2], torch.tensor([0.050, 0.055]).expand(2, 10, 2))


@pytest.mark.parametrize("num_propagated", [0, 8])
def test_forward_shapes_with_and_without_propagated_queries(num_propagated):
    head = small_head(num_propagated=num_propagated).train()
    out = head(feats(2), make_batch(2, torch.eye(4, dtype=torch.float64), 0.0))
    Q = SMALL["num_query"] + num_propagated
    assert out["all_cls_scores"].shape == (2, 2, Q, 10) and out["all_bbox_preds"].shape == (2, 2, Q, 10)
    assert out["dn_mask_dict"]["output_known_lbs_bboxes"][0].shape == (2, 2, 9, 10)


def test_sine_embeddings_follow_upstream_order():
    pos = torch.tensor([[0.1, 0.2, 0.3]])
    emb = pos2posemb3d(pos, num_pos_feats=4)
    # y first, then x, then z; per axis interleaved sin, cos at DETR frequencies 10000^(2 floor(i/2) / 4)
    y = 0.2 * 2 * math.pi
    assert torch.allclose(emb[0, :4], torch.tensor([math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]))
    x = 0.1 * 2 * math.pi
    assert torch.allclose(emb[0, 4:6], torch.tensor([math.sin(x), math.cos(x)]))
    enc = nerf_positional_encoding(torch.tensor([[0.5, 1.0]]))
    # [sin(x), cos(x), sin(2x), cos(2x), ...]: the second frequency's sin and cos come at 4:8
    assert enc.shape == (1, 24)
    assert torch.allclose(enc[0, 4:8], torch.cat([torch.tensor([1.0, 2.0]).sin(), torch.tensor([1.0, 2.0]).cos()]))


def test_cross_attention_mask_opens_only_the_tokens_whose_rays_pass_near_the_query():
    """The small preset's geometric prior (cross_attn_radius): a query 20 m in front of camera 0 sees
    the tokens around that camera's principal point and nothing of camera 1 (looking backwards); a query
    near no ray keeps its 4 nearest tokens, so no attention row is empty."""
    head = small_head(cross_attn_radius=5.0)
    batch = make_batch(1, torch.eye(4, dtype=torch.float64), 0.0)
    lo, hi = head.pc_range[:3], head.pc_range[3:]
    points = torch.tensor([[[20.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    refs = (points - lo) / (hi - lo)
    blocked = head._cross_attn_mask(refs, head._token_rays(batch, (1, N_CAM, H, W), None))
    assert blocked.shape == (1, 1, 2, N_CAM * H * W)
    front = (~blocked[0, 0, 0]).view(N_CAM, H, W)
    assert not front[1].any(), "camera 1 looks away from the query"
    assert front[0, 1:3, 2:4].all(), "the 2 x 2 tokens around the principal point (8 px off: ~4.2 m at 20 m)"
    assert not front[0, :, [0, 5]].any(), "40 px off the principal point: ~12 m from the query"
    assert int((~blocked[0, 0, 1]).sum()) == 4
    out = head.train()(feats(1), batch)
    assert torch.isfinite(out["all_cls_scores"]).all() and torch.isfinite(out["all_bbox_preds"]).all()
