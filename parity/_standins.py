"""Stand-ins the parity scripts share to import the OpenMMLab 1.x stack on CPU torch (see
shared notes: the PyPI torchvision for torch 2.13 is a CUDA build)."""

from __future__ import annotations

import sys
import types

import torch

_LIBS = []  # keeps torch.library registrations alive


def standin_torchvision() -> None:
    """STAND-IN: the PyPI torchvision for torch 2.13 is a CUDA build; on CPU torch its import dies on
    `operator torchvision::nms does not exist`. Skip its fake/autograd registrations and give it a
    Python CPU `nms`. mmcv imports it at module level (and BEVDepth's base_exp lists `torchvision.models`);
    no torchvision op is used by the compared code."""
    if "torchvision" in sys.modules:
        return
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

        def nms(dets, scores, iou_threshold):
            order = scores.argsort(descending=True)
            x1, y1, x2, y2 = dets.unbind(1)
            area = (x2 - x1) * (y2 - y1)
            keep, suppressed = [], torch.zeros(len(dets), dtype=torch.bool)
            for i in order.tolist():
                if suppressed[i]:
                    continue
                keep.append(i)
                w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
                h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
                inter = w * h
                suppressed |= inter / (area[i] + area - inter) > iou_threshold
            return torch.tensor(keep, dtype=torch.long)

        lib.impl("nms", nms, "CPU")
        _LIBS.append(lib)
    except RuntimeError:
        pass  # already defined (a working torchvision build)
    import torchvision  # noqa: F401
