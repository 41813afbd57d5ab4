"""raydrive.ops.attention and StreamPETR's temporal decoder (raydrive/models/streampetr/transformer.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raydrive.models.streampetr.transformer import MultiheadAttention, PETRTemporalDecoder
from raydrive.ops.attention import _npu_mask, attention, reference_attention

KEYS = Path(__file__).resolve().parent / "data" / "streampetr_vov99_800.txt"  # copied from shared/specs/keys
PREFIX = "pts_bbox_head.transformer."

# one upstream layer's keys and shapes (layers.0 of pts_bbox_head.transformer in the vov99 key file)
LAYER_KEYS = {
    "attentions.0.attn.in_proj_weight": (768, 256),
    "attentions.0.attn.in_proj_bias": (768,),
    "attentions.0.attn.out_proj.weight": (256, 256),
    "attentions.0.attn.out_proj.bias": (256,),
    "attentions.1.attn.in_proj_weight": (768, 256),
    "attentions.1.attn.in_proj_bias": (768,),
    "attentions.1.attn.out_proj.weight": (256, 256),
    "attentions.1.attn.out_proj.bias": (256,),
    "ffns.0.layers.0.0.weight": (2048, 256),
    "ffns.0.layers.0.0.bias": (2048,),
    "ffns.0.layers.1.weight": (256, 2048),
    "ffns.0.layers.1.bias": (256,),
    "norms.0.weight": (256,),
    "norms.0.bias": (256,),
    "norms.1.weight": (256,),
    "norms.1.bias": (256,),
    "norms.2.weight": (256,),
    "norms.2.bias": (256,),
}
UPSTREAM_PARAMS = 9_473_024  # sum over the 110 pts_bbox_head.transformer lines of the vov99 key file


def _qkv(b=2, h=3, lq=5, lk=7, d=4, grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)
    return make(b, h, lq, d), make(b, h, lk, d), make(b, h, lk, d)


def _random_mask(*shape, seed=1):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.4
    mask[..., 0] = False  # no fully masked row
    return mask


@pytest.mark.parametrize("mask_shape", [None, (5, 7), (2, 1, 5, 7), (2, 3, 5, 7), (1, 7)])
def test_attention_matches_reference_and_gradients(mask_shape):
    q, k, v = _qkv(grad=True)
    mask = None if mask_shape is None else _random_mask(*mask_shape)
    out = attention(q, k, v, mask, dropout_p=0.0)
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)
    if mask is not None:  # the mask matters: without it the result differs
        assert not torch.allclose(out, reference_attention(q, k, v))


def test_masked_key_has_no_influence():
    q, k, v = _qkv()
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[:, 3] = True
    v2 = v.clone()
    v2[:, :, 3] += 100.0
    torch.testing.assert_close(attention(q, k, v, mask), attention(q, k, v2, mask))


def test_fully_masked_row_is_nan_like_upstream_multihead_attention():
    q, k, v = _qkv()
    mask = _random_mask(5, 7)
    mask[2] = True
    out = attention(q, k, v, mask)
    assert torch.isnan(out[:, :, 2]).all()
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(out[:, :, keep], reference_attention(q, k, v, mask)[:, :, keep])
    # upstream: mmcv MultiheadAttention -> nn.MultiheadAttention with need_weights=True
    mha = torch.nn.MultiheadAttention(4, 2, dtype=torch.float64).eval()
    x = torch.randn(5, 1, 4, dtype=torch.float64)
    mem = torch.randn(7, 1, 4, dtype=torch.float64)
    upstream = mha(x, mem, mem, attn_mask=mask)[0]
    assert torch.isnan(upstream[2]).all() and not torch.isnan(upstream[keep]).any()


def test_dropout_drops_weights():
    q, k, v = _qkv(lk=64)
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, reference_attention(q, k, v))
    assert torch.isfinite(dropped).all()


def test_npu_mask_shapes():
    """The Ascend kernel accepts (Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv), (B, N, Sq, Skv) masks."""
    assert _npu_mask(torch.zeros(1, 7, dtype=torch.bool), 2, 3, 5, 7).shape == (5, 7)
    assert _npu_mask(torch.zeros(1, 1, 5, 7, dtype=torch.bool), 2, 3, 5, 7).shape == (1, 1, 5, 7)
    assert _npu_mask(torch.zeros(2, 1, 1, 7, dtype=torch.bool), 2, 3, 5, 7).shape == (2, 1, 5, 7)
    assert _npu_mask(torch.zeros(3, 5, 7, dtype=torch.bool), 2, 3, 5, 7).shape == (2, 3, 5, 7)


def _copy_into_torch_mha(ours: MultiheadAttention) -> torch.nn.MultiheadAttention:
    mha = torch.nn.MultiheadAttention(ours.embed_dims, ours.num_heads, dtype=torch.float64).eval()
    mha.load_state_dict(ours.attn.state_dict())
    return mha


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_matches_torch(cross):
    torch.manual_seed(0)
    c, heads, b, lq = 16, 4, 2, 6
    lk = 9 if cross else lq
    ours = MultiheadAttention(c, heads, attn_drop=0.1, residual_drop=0.1).double().eval()
    torch.nn.init.normal_(ours.attn.in_proj_bias)  # non-zero biases so their layout is checked too
    torch.nn.init.normal_(ours.attn.out_proj.bias)
    mha = _copy_into_torch_mha(ours)
    query, query_pos = torch.randn(2, b, lq, c, dtype=torch.float64)
    key, key_pos = torch.randn(2, b, lk, c, dtype=torch.float64)
    mask = _random_mask(lq, lk)
    out = ours(query, key, key, query_pos=query_pos, key_pos=key_pos, attn_mask=mask)
    # mmcv semantics: positions on query and key only, identity residual, (L, B, C) for torch
    t = lambda x: x.transpose(0, 1)
    expected = query + t(mha(t(query + query_pos), t(key + key_pos), t(key), attn_mask=mask)[0])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # sequence-first layout gives the same numbers
    seq_first = MultiheadAttention(c, heads, batch_first=False).double().eval()
    seq_first.load_state_dict(ours.state_dict())
    out_sf = seq_first(t(query), t(key), t(key), query_pos=t(query_pos), key_pos=t(key_pos), attn_mask=mask)
    torch.testing.assert_close(t(out_sf), out, rtol=1e-12, atol=1e-12)


def test_decoder_keys_and_shapes_match_upstream():
    with torch.device("meta"):
        model = PETRTemporalDecoder(num_layers=6, embed_dims=256, num_heads=8, ffn_dims=2048)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {f"decoder.layers.{i}.{k}": s for i in range(6) for k, s in LAYER_KEYS.items()}
    expected |= {"decoder.post_norm.weight": (256,), "decoder.post_norm.bias": (256,)}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == UPSTREAM_PARAMS


def test_decoder_keys_equal_key_file():
    with torch.device("meta"):
        model = PETRTemporalDecoder()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    upstream = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith(PREFIX):
            key, shape = line[len(PREFIX) :].split(" ", 1)
            upstream[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    assert got == upstream
    assert sum(math.prod(s) for s in upstream.values()) == UPSTREAM_PARAMS


def _decoder_inputs(b=2, q=5, m=3, n=11, c=32):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g)
    mask = torch.zeros(q, q + m, dtype=torch.bool)
    mask[2:, :2] = True  # denoising-like: later queries may not see the first two
    return dict(
        query=make(b, q, c),
        key=make(b, n, c),
        query_pos=make(b, q, c),
        key_pos=make(b, n, c),
        temp_memory=make(b, m, c),
        temp_pos=make(b, m, c),
        attn_mask=mask,
    )


def test_decoder_output_shape_and_memory_matters():
    torch.manual_seed(0)
    model = PETRTemporalDecoder(num_layers=3, embed_dims=32, num_heads=4, ffn_dims=64).eval()
    inputs = _decoder_inputs()
    out = model(**inputs)
    assert out.shape == (3, 2, 5, 32)
    assert torch.isfinite(out).all()
    # each layer output went through the post-norm (LayerNorm weight 1, bias 0 at init)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 2, 5), atol=1e-5, rtol=0)
    no_memory = model(**(inputs | dict(temp_memory=None, temp_pos=None, attn_mask=inputs["attn_mask"][:, :5])))
    assert not torch.allclose(out, no_memory)


def test_decoder_checkpointing_matches_plain():
    torch.manual_seed(0)
    plain = PETRTemporalDecoder(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, with_cp=False)
    ckpt = PETRTemporalDecoder(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    inputs = _decoder_inputs()
    torch.testing.assert_close(ckpt.eval()(**inputs), plain.eval()(**inputs))
    # training: same dropout masks on the replay, so gradients equal those without checkpointing
    grads = []
    for model in (plain.train(), ckpt.train()):
        model.zero_grad()
        torch.manual_seed(1)
        out = model(**inputs)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain)


def test_dropout_placement_follows_upstream_config():
    """dropout=0.1: self-attention drops weights and residual; flash cross-attention only the residual."""
    layer = PETRTemporalDecoder(num_layers=1, embed_dims=32, num_heads=4, ffn_dims=64).decoder.layers[0]
    self_attn, cross_attn = layer.attentions
    assert (self_attn.attn.attn_drop, self_attn.dropout_layer.p, self_attn.proj_drop.p) == (0.1, 0.1, 0.0)
    assert (cross_attn.attn.attn_drop, cross_attn.dropout_layer.p, cross_attn.proj_drop.p) == (0.0, 0.1, 0.0)
    ffn = layer.ffns[0].layers
    assert (ffn[0][2].p, ffn[2].p) == (0.1, 0.1)
