"""Multi-head scaled dot-product attention with a boolean "not allowed" mask.

Shapes: q (B, heads, Lq, D), k and v (B, heads, Lk, D); `attn_mask` bool, broadcastable to
(B, heads, Lq, Lk), True = the query may NOT look at that key (mmcv's / nn.MultiheadAttention's
convention). `dropout_p` drops attention weights; callers pass 0 in eval mode.

Dispatch: Ascend tensors (device.type == "npu") go to `torch_npu.npu_fusion_attention` (layout BSND,
its `atten_mask` is also True = masked); everything else to `F.scaled_dot_product_attention`, whose
bool mask means True = allowed, so the mask is inverted there.

Fully masked rows: upstream StreamPETR runs mmcv's MultiheadAttention, which calls
`nn.MultiheadAttention` with `need_weights=True`, i.e. an explicit softmax over a row of -inf: the
output row is NaN (torch 1.x and 2.x alike). SDPA in torch >= 2.5 returns 0 for such a row and the
Ascend kernel's value is unspecified, so `attention` writes NaN into every fully masked row on every
path: NaN exactly where upstream has NaN, never elsewhere. StreamPETR's denoising mask never masks a
whole row (each query always sees itself), so this only matters for misuse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked keys excluded) v, with dropout on the weights. Returns (B, heads, Lq, D)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be bool (True = not allowed), got {attn_mask.dtype}")
    if q.device.type == "npu":
        out = _npu_fusion_attention(q, k, v, attn_mask, dropout_p)
    else:
        allowed = None if attn_mask is None else ~attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    return _nan_fully_masked_rows(out, attn_mask)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(D) with masked scores at -inf) v, no dropout (for tests)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _nan_fully_masked_rows(out: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Set rows whose keys are all masked to NaN, as upstream's softmax over -inf gives (no host sync)."""
    if attn_mask is None:
        return out
    fully_masked = attn_mask.all(dim=-1).unsqueeze(-1)  # (..., Lq, 1), broadcasts over D
    return out.masked_fill(fully_masked, float("nan"))


def _npu_fusion_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """Ascend fused attention (torch_npu.npu_fusion_attention, Atlas A2). Untested here: no NPU."""
    import torch_npu  # Ascend only

    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    mask = None if attn_mask is None else _npu_mask(attn_mask, batch, heads, len_q, len_k)
    # BSND = (batch, seq, heads, head_dim); the kernel returns (out, softmax_max, softmax_sum, ...)
    out = torch_npu.npu_fusion_attention(
        q.transpose(1, 2).contiguous(),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        heads,
        "BSND",
        atten_mask=mask,
        scale=1.0 / math.sqrt(head_dim),
        keep_prob=1.0 - dropout_p,
        sparse_mode=0,  # 0 = the full mask as given
    )[0]
    return out.transpose(1, 2)


def _npu_mask(attn_mask: torch.Tensor, batch: int, heads: int, len_q: int, len_k: int) -> torch.Tensor:
    """Shape the mask as one the kernel accepts: (Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv) or (B, N, Sq, Skv)."""
    if attn_mask.dim() <= 2:
        return attn_mask.expand(len_q, len_k).contiguous()
    mask4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask4.shape[0] == 1 and mask4.shape[1] == 1:
        return mask4.expand(1, 1, len_q, len_k).contiguous()
    return mask4.expand(batch, 1 if mask4.shape[1] == 1 else heads, len_q, len_k).contiguous()
