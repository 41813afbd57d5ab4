"""StreamPETR's temporal decoder (the module at `pts_bbox_head.transformer`).

Follows upstream projects/mmdet3d_plugin/models/utils/petr_transformer.py (`PETRTemporalTransformer`,
`PETRTransformerDecoder`, `PETRTemporalDecoderLayer`, `PETRMultiheadFlashAttention`) with the vov and
r50 configs' settings, and mmcv 1.x's `MultiheadAttention` and `FFN` bricks:

- every layer runs self_attn, norm, cross_attn, norm, ffn, norm (post-norm);
- self-attention keys/values are the queries followed by the temporal memory; positions are added to
  queries and keys but never to values; the residual is the attention's input query;
- `dropout=0.1` in the config becomes attention-weight dropout AND residual dropout for the
  self-attention (mmcv MultiheadAttention), but only residual dropout for the cross-attention: upstream
  hands `attn_drop` positionally to `FlashMHA`, whose third argument is `bias`, so flash attention runs
  with dropout 0;
- FFN: Linear-ReLU-Dropout, Linear, Dropout, plus the identity;
- every layer's output goes through one shared `post_norm`, and all are stacked;
- `with_cp` checkpoints each layer in training (the configs set it True).

Upstream runs flash cross-attention in fp16; here attention runs in the input dtype (raydrive's AMP
decides). Tensors are batch first throughout: (B, L, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from raydrive.ops.attention import attention


class ProjectedAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight (3C, C), in_proj_bias, out_proj) and math, batch first.

    The attention itself goes through raydrive.ops.attention.attention (SDPA / Ascend fused kernel).
    """

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims))
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As nn.MultiheadAttention: xavier-uniform in-projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query (B, Lq, C), key and value (B, Lk, C); attn_mask bool (Lq, Lk) or broadcastable to
        (B, heads, Lq, Lk), True = not allowed. Returns (B, Lq, C)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        out = attention(q, k, v, attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        batch, _, len_q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, len_q, self.embed_dims))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, heads, L, C / heads)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)


class MultiheadAttention(nn.Module):
    """mmcv's MultiheadAttention wrapper (also upstream's PETRMultiheadFlashAttention): positions added to
    query and key, identity residual, proj_drop then dropout_layer on the attention output.

    attn_drop: dropout on attention weights; proj_drop: on the output; residual_drop: mmcv's
    `dropout_layer` (drop_prob). batch_first=False takes (L, B, C) tensors, as mmcv's default.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        residual_drop: float = 0.0,
        batch_first: bool = True,
    ):
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.attn = ProjectedAttention(embed_dims, num_heads, attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = nn.Dropout(residual_drop)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        key_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Missing key = query, missing value = key, missing identity = query (before its position);
        missing key_pos = query_pos when the shapes agree (mmcv's rule)."""
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self.attn(query, key, value, attn_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class FFN(nn.Module):
    """mmcv's FFN with num_fcs=2: Linear-ReLU-Dropout, Linear, Dropout, plus the identity."""

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024, ffn_drop: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        return (x if identity is None else identity) + self.layers(x)


class PETRTemporalDecoderLayer(nn.Module):
    """One post-norm decoder layer: self_attn (queries + temporal memory), norm, cross_attn, norm, ffn, norm."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        with_cp: bool = False,
    ):
        super().__init__()
        self_attn = MultiheadAttention(embed_dims, num_heads, attn_drop=dropout, residual_drop=dropout)
        # upstream's flash attention gets no attention dropout (see the module docstring)
        cross_attn = MultiheadAttention(embed_dims, num_heads, attn_drop=0.0, residual_drop=dropout)
        self.attentions = nn.ModuleList([self_attn, cross_attn])
        self.ffns = nn.ModuleList([FFN(embed_dims, ffn_dims, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])
        self.with_cp = with_cp

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        temp_memory: torch.Tensor | None = None,
        temp_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Shapes as PETRTemporalTransformer.forward; returns (B, Q, C)."""
        args = (query, key, query_pos, key_pos, temp_memory, temp_pos, attn_mask, cross_attn_mask)
        if self.with_cp and self.training:
            # recomputed in backward; dropout masks are replayed (RNG state preserved)
            return cp.checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(
        self, query, key, query_pos, key_pos, temp_memory, temp_pos, attn_mask, cross_attn_mask=None
    ) -> torch.Tensor:
        if temp_memory is not None:
            self_key = torch.cat([query, temp_memory], dim=1)
            self_pos = torch.cat([query_pos, temp_pos], dim=1)
        else:
            self_key, self_pos = query, query_pos
        query = self.attentions[0](
            query, self_key, self_key, query_pos=query_pos, key_pos=self_pos, attn_mask=attn_mask
        )
        query = self.norms[0](query)
        query = self.attentions[1](query, key, key, query_pos=query_pos, key_pos=key_pos, attn_mask=cross_attn_mask)
        query = self.norms[1](query)
        query = self.ffns[0](query)
        return self.norms[2](query)


class PETRTransformerDecoder(nn.Module):
    """The layer stack; every layer's output passes the shared post_norm (return_intermediate=True)."""

    def __init__(
        self,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        with_cp: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            [PETRTemporalDecoderLayer(embed_dims, num_heads, ffn_dims, dropout, with_cp) for _ in range(num_layers)]
        )
        self.post_norm = nn.LayerNorm(embed_dims)

    def forward(
        self, query, key, query_pos, key_pos, temp_memory=None, temp_pos=None, attn_mask=None, cross_attn_mask=None
    ) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            query = layer(query, key, query_pos, key_pos, temp_memory, temp_pos, attn_mask, cross_attn_mask)
            outputs.append(self.post_norm(query))
        return torch.stack(outputs)


class PETRTemporalTransformer(nn.Module):
    """`pts_bbox_head.transformer`: holds `decoder` (keys `decoder.layers.N.*`, `decoder.post_norm.*`)."""

    def __init__(
        self,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        with_cp: bool = False,
    ):
        super().__init__()
        self.embed_dims = embed_dims
        self.decoder = PETRTransformerDecoder(num_layers, embed_dims, num_heads, ffn_dims, dropout, with_cp)
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream's DETR init: xavier-uniform (gain 1, zero bias) for every module whose `weight` is a
        matrix (the Linears); attention in-projections keep nn.MultiheadAttention's init; norms stay 1 / 0."""
        for module in self.modules():
            if isinstance(module, ProjectedAttention):
                module.reset_parameters()
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() > 1:
                nn.init.xavier_uniform_(weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        temp_memory: torch.Tensor | None = None,
        temp_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Q, C) (None = zeros, as upstream's tgt); key (B, N*h*w, C), also the value; query_pos
        (B, Q, C); key_pos (B, N*h*w, C); temp_memory / temp_pos (B, M, C), extra self-attention keys and
        values after the queries; attn_mask bool (Q, Q+M), True = masked, self-attention only;
        cross_attn_mask bool (B, 1, Q, N*h*w), True = masked, cross-attention only (None upstream).
        Returns (num_layers, B, Q, C)."""
        if query is None:
            query = torch.zeros_like(query_pos)
        return self.decoder(query, key, query_pos, key_pos, temp_memory, temp_pos, attn_mask, cross_attn_mask)


# the name the StreamPETR contract uses for this module
PETRTemporalDecoder = PETRTemporalTransformer
