"""Deformable convolution v1 (mmcv 1.x `DeformConv2d` / `DeformConv2dPack`, conv type 'DCN') in plain PyTorch.

BEVDepth's depth net ends in `build_conv_layer(dict(type='DCN', in_channels=512, out_channels=512,
kernel_size=3, padding=1, groups=4, im2col_step=128))`; this module gives the same layer, the same
state-dict keys (`weight`, `conv_offset.weight`, `conv_offset.bias`) and the same arithmetic, without
mmcv's compiled extension (torchvision's `deform_conv2d` is not used: its PyPI wheel does not import on
CPU-only torch).

Semantics, from mmcv's im2col kernels (`mmcv/ops/csrc/pytorch/cpu/deform_conv.cpp` and
`mmcv/ops/csrc/common/cuda/deform_conv_cuda_kernel.cuh`, unchanged from v1.7.2 to main):
- offset (N, deform_groups * 2 * kh * kw, Ho, Wo): for deform group g and kernel tap k = i * kw + j,
  channel g * 2 * kh * kw + 2 * k is dy and the next channel is dx (`data_offset_h_ptr` / `_w_ptr`);
  input channel c belongs to deform group c // (C / deform_groups).
- the tap samples at y = ho * stride_h - pad_h + i * dilation_h + dy (x likewise), bilinearly;
  a sample with y <= -1, y >= H, x <= -1 or x >= W is 0, and inside that band each of the four corners
  that lies outside the image contributes 0 (`deformable_im2col_bilinear`).
- the columns (C * kh * kw rows in (c, i, j) order) are multiplied group by group with the weight
  (O, C / groups, kh, kw); mmcv has no bias (`DeformConv2d` asserts bias=False).
- backward: the gradient of that piecewise-bilinear map; at an integer coordinate the cell starting there
  is used (floor), and a sample outside the (-1, H) x (-1, W) band has zero gradient for x and offset
  (`get_gradient_weight`, `get_coordinate_weight`).
- mixed precision: mmcv casts input to the offset's dtype and weight to the input's
  (`DeformConv2dFunction.forward` in `mmcv/ops/deform_conv.py`), so under autocast the layer runs in the
  dtype `conv_offset` produced; so does this one, except that sampling coordinates are computed in fp32.

Implementation: the columns are built channels-last with one `index_select` per bilinear corner (rows
(n, output pixel, tap, deform group), each C / deform_groups wide) and multiplied with the weight per
conv group. A custom autograd function keeps only x, offset and weight for backward and rebuilds the
samples there, so the layer's saved activations are its inputs rather than four corner-sized copies of
the column matrix. `im2col_step` has mmcv's meaning (samples per im2col pass) and bounds the transient
column memory.

No Ascend kernel is dispatched: `mx_driving.deform_conv2d` (Ascend/DrivingSDK `mx_driving/ops/deform_conv2d.py`)
works on NHWC tensors and has not been checked against these semantics on hardware; the ops used here
(index_select, index_add_, matmul) all run on NPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
    im2col_step: int | None = None,
) -> torch.Tensor:
    """Deformable convolution with mmcv's `deform_conv2d` semantics (see the module docstring).

    x: (N, C, H, W); offset: (N, deform_groups * 2 * kh * kw, Ho, Wo); weight: (O, C / groups, kh, kw);
    bias: optional (O,) added to the output (mmcv's layer has none).
    im2col_step: at most this many samples per im2col pass (None: the whole batch at once).
    Returns (N, O, Ho, Wo).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if x.dim() != 4:
        raise ValueError(f"expected a 4D input, got {x.dim()}D")
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if c % groups or o % groups or cg != c // groups:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {c} input channels in {groups} groups")
    if c % deform_groups:
        raise ValueError(f"{c} input channels are not divisible by deform_groups={deform_groups}")
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {h}x{w} is too small for the kernel (output would be {ho}x{wo})")
    if tuple(offset.shape) != (n, deform_groups * 2 * kh * kw, ho, wo):
        raise ValueError(
            f"offset must be {(n, deform_groups * 2 * kh * kw, ho, wo)} for this input and weight, "
            f"got {tuple(offset.shape)}"
        )
    # mmcv: `input = input.type_as(offset); weight = weight.type_as(input)`
    x = x.to(offset.dtype)
    weight = weight.to(offset.dtype)
    geometry = (stride, padding, dilation, groups, deform_groups)
    step = n if not im2col_step else min(int(im2col_step), n)
    if step >= n:
        out = _DeformConv2d.apply(x, offset, weight, geometry)
    else:
        out = torch.cat(
            [
                _DeformConv2d.apply(xc, oc, weight, geometry)
                for xc, oc in zip(x.split(step), offset.split(step), strict=True)
            ]
        )
    if bias is not None:
        out = out + bias.to(out.dtype)[None, :, None, None]
    return out


def _no_autocast(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError, ValueError):
        pass
    return contextlib.nullcontext()


def _corners(offset, h, w, kh, kw, stride, padding, dilation, deform_groups):
    """Row index into the channels-last input and bilinear weight (with its y and x derivatives) of each
    corner of each sample. Every tensor is laid out (N, Ho * Wo, kh * kw, deform_groups).

    Coordinates are computed in fp32 at least (mmcv's kernel does them in the tensor's dtype, which for fp16
    is a 1/32 pixel grid at x = 44); the bilinear weights are returned in the offset's dtype, their
    derivatives in the coordinate dtype."""
    n, _, ho, wo = offset.shape
    k = kh * kw
    device = offset.device
    dtype = torch.float32 if offset.dtype in (torch.float16, torch.bfloat16) else offset.dtype
    off = (
        offset.to(dtype)
        .reshape(n, deform_groups, k, 2, ho, wo)
        .permute(0, 4, 5, 2, 1, 3)
        .reshape(n, ho * wo, k, deform_groups, 2)
    )
    # tap positions before the offset: y = ho * stride - pad + i * dilation, x = wo * stride - pad + j * dilation
    oy = torch.arange(ho, device=device, dtype=dtype) * stride[0] - padding[0]
    ox = torch.arange(wo, device=device, dtype=dtype) * stride[1] - padding[1]
    ty = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)
    tx = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    base_y = (oy[:, None, None] + ty[None, None, :]).expand(ho, wo, k).reshape(ho * wo, k, 1)
    base_x = (ox[None, :, None] + tx[None, None, :]).expand(ho, wo, k).reshape(ho * wo, k, 1)
    y = base_y + off[..., 0]
    x = base_x + off[..., 1]
    # mmcv: `if (h_im > -1 && w_im > -1 && h_im < height && w_im < width)` else the sample is 0
    inside = (y > -1) & (x > -1) & (y < h) & (x < w)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    plane = (
        torch.arange(n, device=device)[:, None, None, None] * deform_groups
        + torch.arange(deform_groups, device=device)[None, None, None, :]
    ) * (h * w)
    out = []
    # (corner y, corner x, weight along y, weight along x, d(weight_y)/dy, d(weight_x)/dx)
    for cy, cx, wy, wx, sy, sx in (
        (y0, x0, hy, hx, -1.0, -1.0),
        (y0, x0 + 1, hy, lx, -1.0, 1.0),
        (y0 + 1, x0, ly, hx, 1.0, -1.0),
        (y0 + 1, x0 + 1, ly, lx, 1.0, 1.0),
    ):
        # mmcv: a corner outside [0, H - 1] x [0, W - 1] reads 0
        valid = (inside & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)).to(dtype)
        row = plane + cy.clamp(0, h - 1).long() * w + cx.clamp(0, w - 1).long()
        out.append((row.reshape(-1), (wy * wx * valid).to(offset.dtype), sy * wx * valid, sx * wy * valid))
    return out


def _channels_last(x, deform_groups):
    n, c, h, w = x.shape
    return x.reshape(n, deform_groups, c // deform_groups, h, w).permute(0, 1, 3, 4, 2).reshape(-1, c // deform_groups)


def _grouped_weight(weight, groups):
    """(O, C / G, kh, kw) -> (G, O / G, kh * kw * C / G), columns in (tap, channel) order like the samples."""
    o, cg, kh, kw = weight.shape
    return weight.view(groups, o // groups, cg, kh * kw).transpose(2, 3).reshape(groups, o // groups, kh * kw * cg)


def _grouped_cols(cols, groups):
    """(N, L, K, C) samples -> (N, G, L, K * C / G)."""
    n, length, k, c = cols.shape
    if groups == 1:
        return cols.view(n, 1, length, k * c)
    return (
        cols.view(n, length, k, groups, c // groups)
        .permute(0, 3, 1, 2, 4)
        .reshape(n, groups, length, k * (c // groups))
    )


class _DeformConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, weight, geometry):
        stride, padding, dilation, groups, deform_groups = geometry
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        _, _, ho, wo = offset.shape
        with _no_autocast(x.device.type):
            corners = _corners(offset, h, w, kh, kw, stride, padding, dilation, deform_groups)
            src = _channels_last(x, deform_groups)
            cols = buf = None
            for row, wt, _, _ in corners:
                if cols is None:
                    cols = src.index_select(0, row).view(*wt.shape, -1).mul_(wt[..., None])
                else:
                    buf = torch.index_select(src, 0, row, out=buf)
                    cols.addcmul_(buf.view_as(cols), wt[..., None])
            del buf
            cols = _grouped_cols(cols.view(n, ho * wo, kh * kw, c), groups)
            out = torch.matmul(cols, _grouped_weight(weight, groups).transpose(1, 2))  # (N, G, L, O / G)
            out = out.permute(0, 1, 3, 2).reshape(n, o, ho, wo)
        ctx.save_for_backward(x, offset, weight)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, weight = ctx.saved_tensors
        stride, padding, dilation, groups, deform_groups = ctx.geometry
        need_x, need_offset, need_weight = ctx.needs_input_grad[:3]
        n, c, h, w = x.shape
        o, cg, kh, kw = weight.shape
        _, _, ho, wo = offset.shape
        k, cd = kh * kw, c // deform_groups
        with _no_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype).reshape(n, groups, o // groups, ho * wo)
            wg = _grouped_weight(weight, groups)
            corners = _corners(offset, h, w, kh, kw, stride, padding, dilation, deform_groups)
            src = _channels_last(x, deform_groups)
            grad_cols = None
            if need_x or need_offset:
                grad_cols = torch.matmul(grad_out.transpose(2, 3), wg)  # (N, G, L, K * C / G)
                if groups > 1:
                    grad_cols = grad_cols.view(n, groups, ho * wo, k, cg).permute(0, 2, 3, 1, 4)
                grad_cols = grad_cols.reshape(n, ho * wo, k, deform_groups, cd)
            acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            grad_src = torch.zeros(src.shape, dtype=acc, device=x.device) if need_x else None
            grad_y = grad_x_off = cols = buf = None
            # one corner at a time, through one reused buffer: the sampled values v feed the weight gradient
            # (columns = sum of w * v) and the offset gradient (v . d loss / d column, times dw / dy or dw / dx)
            for row, wt, dwy, dwx in corners:
                if need_offset or need_weight:
                    buf = torch.index_select(src, 0, row, out=buf)
                    v = buf.view(*wt.shape, cd)
                    if need_weight:
                        cols = v * wt[..., None] if cols is None else cols.addcmul_(v, wt[..., None])
                    if need_offset:
                        gv = v.mul_(grad_cols).sum(-1, dtype=dwy.dtype)  # d loss / d (this corner's value)
                        grad_y = gv * dwy if grad_y is None else grad_y.addcmul_(gv, dwy)
                        grad_x_off = gv * dwx if grad_x_off is None else grad_x_off.addcmul_(gv, dwx)
                if need_x:
                    if buf is None:
                        buf = grad_cols.new_empty(grad_cols.shape)
                    gx = torch.mul(grad_cols, wt[..., None], out=buf.view(grad_cols.shape))
                    grad_src.index_add_(0, row, gx.reshape(-1, cd).to(acc))
            del buf, grad_cols
            grad_x = grad_offset = grad_weight = None
            if need_x:
                grad_x = grad_src.view(n, deform_groups, h, w, cd).permute(0, 1, 4, 2, 3).reshape(n, c, h, w)
                grad_x = grad_x.to(x.dtype)
            if need_offset:
                g = torch.stack([grad_y, grad_x_off], dim=-1)  # (N, L, K, DG, 2)
                grad_offset = g.permute(0, 3, 2, 4, 1).reshape(offset.shape).to(offset.dtype)
            if need_weight:
                cols = _grouped_cols(cols.view(n, ho * wo, k, c), groups)
                gw = torch.einsum("ngol,nglk->gok", grad_out, cols)  # (G, O / G, K * C / G)
                grad_weight = gw.view(groups, o // groups, k, cg).transpose(2, 3).reshape(weight.shape)
        return grad_x, grad_offset, grad_weight, None


def deform_conv2d_oracle(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> torch.Tensor:
    """Slow loop transcription of mmcv's im2col + grouped GEMM in float64 (for tests on tiny inputs)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    _, _, ho, wo = offset.shape
    xs, offs, wts = x.double().tolist(), offset.double().tolist(), weight.double().tolist()

    def bilinear(img, yy, xx):  # mmcv deformable_im2col_bilinear
        if yy <= -1 or h <= yy or xx <= -1 or w <= xx:
            return 0.0
        y0, x0 = math.floor(yy), math.floor(xx)
        ly, lx = yy - y0, xx - x0
        val = 0.0
        for cy, cx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                           (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):  # fmt: skip
            if 0 <= cy <= h - 1 and 0 <= cx <= w - 1:
                val += wt * img[cy][cx]
        return val

    out = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    for b in range(n):
        for oc in range(o):
            g = oc // (o // groups)
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0
                    for ci in range(cg):
                        ch = g * cg + ci
                        dg = ch // (c // deform_groups)
                        for i in range(kh):
                            for j in range(kw):
                                tap = dg * 2 * kh * kw + 2 * (i * kw + j)
                                yy = oy * sh - ph + i * dh + offs[b][tap][oy][ox]
                                xx = ox * sw - pw + j * dw + offs[b][tap + 1][oy][ox]
                                acc += wts[oc][ci][i][j] * bilinear(xs[b][ch], yy, xx)
                    out[b, oc, oy, ox] = acc
    return out


class DeformConv2dPack(nn.Module):
    """mmcv 1.x `DeformConv2dPack` (registered as conv type 'DCN'): a conv that predicts its own offsets.

    State dict: `weight` (out, in / groups, kh, kw), `conv_offset.weight`
    (deform_groups * 2 * kh * kw, in, kh, kw) and `conv_offset.bias`; the offset conv starts at zero
    (mmcv `init_offset`), so a fresh layer is a plain grouped conv. `im2col_step` is accepted for config
    compatibility (upstream BEVDepth passes 128) and bounds the samples per im2col pass.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("bias=True is not supported by mmcv's DeformConv2d (its state dict has no bias)")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must divide by {groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups, self.im2col_step = groups, deform_groups, im2col_step
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")  # mmcv DeformConv2d.reset_parameters
        nn.init.zeros_(self.conv_offset.weight)  # mmcv DeformConv2dPack.init_offset
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
            self.im2col_step,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias=False"
        )
