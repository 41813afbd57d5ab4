"""Colours shared by the BEV view and the camera images: one per detection class (CLASSES order)."""

from __future__ import annotations

from raydrive.data.constants import CLASSES

CLASS_COLORS: dict[str, str] = {
    "car": "#1f77b4",
    "truck": "#ff7f0e",
    "construction_vehicle": "#8c564b",
    "bus": "#d62728",
    "trailer": "#9467bd",
    "barrier": "#5f5f5f",
    "motorcycle": "#e377c2",
    "bicycle": "#17becf",
    "pedestrian": "#2ca02c",
    "traffic_cone": "#bcbd22",
}
OTHER_COLOR = "#9e9e9e"  # a label outside CLASSES
# map element classes of the vectorised-map models (MapTR / SparseDrive order)
MAP_CLASSES: tuple[str, ...] = ("ped_crossing", "divider", "boundary")
MAP_COLORS: tuple[str, ...] = ("#b39ddb", "#e6b422", "#37474f", "#80cbc4", "#bcaaa4")  # apart from CLASS_COLORS
EGO_COLOR = "#000000"
PLAN_COLOR = "#e6007e"


def class_color(label: int) -> str:
    return CLASS_COLORS[CLASSES[label]] if 0 <= label < len(CLASSES) else OTHER_COLOR


def rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b) in 0..255."""
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
