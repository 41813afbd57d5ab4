"""The bird's-eye view of one key frame: matplotlib on the Agg canvas (no pyplot, no global backend).

Layout, which the tests rely on: a square plot of `size` pixels on the left of the image, with the
key-frame ego frame's origin at its centre, x (forward) up and y (left) to the left, `range_m` metres
from the centre to each edge; so the ego-frame point (x, y) is at column `(range_m - y) / (2 range_m)
* size` and row `(range_m - x) / (2 range_m) * size` (`pixel`). A strip of `STRIP` pixels on the right
holds the title and the legend, so that they hide nothing.

Ground truth: class-coloured boxes filled at `GT_ALPHA`, with a heading tick (centre -> front) and a
velocity arrow (where the box is one second later). Predictions: dashed class-coloured outlines with
the same tick and arrow, the `score_labels` best with their score; when fewer than `min_shown` reach
`score_thresh`, the next best up to `min_shown` are drawn faint (dotted), so that a weak model's best
guesses still show. Everything else a model predicts
is drawn by layers keyed by the name of a prediction dict's entry (`BEV_LAYERS`): `instance_ids`
(track ids, and trails over the frames rendered so far), `map_polylines` (with `map_labels`,
`map_scores`), `trajectories` (per box: (T, 2) or (M, T, 2), with `trajectory_scores`) and
`ego_trajectory` (the planned path, (T, 2) or (M, T, 2), with `ego_trajectory_scores`); points in
the model's box frame. A new model adds a layer with `@bev_layer("its_key")`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raydrive.data.constants import CLASSES
from raydrive.viz.frames import Boxes
from raydrive.viz.style import CLASS_COLORS, EGO_COLOR, MAP_CLASSES, MAP_COLORS, PLAN_COLOR, class_color

GT_ALPHA = 0.35
BACKGROUND = "#ffffff"
VELOCITY_SECONDS = 1.0  # a velocity arrow ends where the box is this many seconds later
EGO_LWH = (4.08, 1.73, 1.56)  # nuScenes' Renault Zoe
EGO_CENTER_X = 1.3  # the body's centre ahead of the ego origin (rear axle), metres
STRIP = 230  # pixels right of the plot for the title and the legend


def pixel(x, y, range_m: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) in the BEV image of ego-frame points (x forward, y left)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (range_m - y) / (2 * range_m) * size, (range_m - x) / (2 * range_m) * size


def _uv(xy: np.ndarray) -> np.ndarray:
    """Ego (x, y) -> plot (u, v) = (-y, x): forward up, left to the left."""
    xy = np.asarray(xy, dtype=np.float64)
    return np.stack([-xy[..., 1], xy[..., 0]], axis=-1)


@dataclass
class BevContext:
    """What a layer gets besides its own value: the axes (plot coordinates from `uv`), the whole
    prediction dict, the predictions in the ego frame and which of them are drawn (`shown`), the track
    trails, and `to_ego`, which maps points of the model's box frame ((..., 2) or (..., 3)) to ego x, y."""

    ax: object
    pred: dict
    boxes: Boxes
    shown: np.ndarray
    to_ego: Callable[[np.ndarray], np.ndarray]
    tracks: dict[int, np.ndarray] = field(default_factory=dict)
    labels: int = 10  # how many of `shown` (the best) carry text
    legend: list = field(default_factory=list)  # (handle, label) pairs a layer adds to the legend

    uv = staticmethod(_uv)


BevLayer = Callable[[BevContext, object], None]
BEV_LAYERS: dict[str, BevLayer] = {}


def bev_layer(key: str) -> Callable[[BevLayer], BevLayer]:
    """Register `fn(ctx, value)` to draw a prediction dict's `key` in the BEV view."""

    def register(fn: BevLayer) -> BevLayer:
        BEV_LAYERS[key] = fn
        return fn

    return register


def render_bev(
    gt: Boxes,
    pred: Boxes,
    *,
    pred_dict: dict | None = None,
    box_to_ego: np.ndarray | None = None,
    tracks: dict[int, np.ndarray] | None = None,
    title: str = "",
    range_m: float = 55.0,
    size: int = 800,
    score_thresh: float = 0.3,
    max_pred: int = 100,
    min_shown: int = 10,
    score_labels: int = 10,
):
    """The BEV picture as a PIL RGB image (see the module doc for the layout). `pred_dict` (the model's
    raw outputs) and `box_to_ego` feed the layers; `tracks` are past ego-frame centres per instance id."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from PIL import Image

    width = size + STRIP
    fig = Figure(figsize=(width / 100, size / 100), dpi=100, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, size / width, 1))
    ax.set_xlim(-range_m, range_m)
    ax.set_ylim(-range_m, range_m)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_facecolor(BACKGROUND)
    _grid(ax, range_m)
    _ego(ax)

    strong, faint = pred.pick(score_thresh, max_pred, min_shown)
    shown = np.concatenate([strong, faint])
    m = np.eye(4) if box_to_ego is None else box_to_ego

    def to_ego(points):
        p = np.asarray(points, dtype=np.float64)
        p3 = np.concatenate([p[..., :2], p[..., 2:3] if p.shape[-1] > 2 else np.zeros_like(p[..., :1])], axis=-1)
        return (p3 @ m[:3, :3].T + m[:3, 3])[..., :2]

    ctx = BevContext(ax, pred_dict or {}, pred, shown, to_ego, tracks or {}, score_labels)
    for key, layer in BEV_LAYERS.items():
        if key in ctx.pred and key not in LAYERS_OVER_BOXES:
            layer(ctx, ctx.pred[key])
    _boxes(ax, gt, filled=True)
    _boxes(ax, pred.take(faint), filled=False, faint=True)
    _boxes(ax, pred.take(strong), filled=False)
    _scores(ax, pred.take(shown[:score_labels]))
    for key in LAYERS_OVER_BOXES:
        if key in ctx.pred and key in BEV_LAYERS:
            BEV_LAYERS[key](ctx, ctx.pred[key])
    left = (size + 10) / width
    fig.add_artist(Line2D([size / width] * 2, [0, 1], color="#cccccc", linewidth=1.0))
    if title:
        fig.text(left, 1 - 10 / size, title, va="top", ha="left", fontsize=9, linespacing=1.5)
    if len(faint):
        ctx.legend.append(
            (Patch(facecolor="none", edgecolor="#999999", linestyle=":", linewidth=1.2), "under the score")
        )
    _legend(fig, gt, pred.take(shown), ctx.legend, (left, 1 - 130 / size))
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def _grid(ax, range_m: float) -> None:
    from matplotlib.patches import Circle

    for r in range(10, int(range_m * 1.5) + 1, 10):
        ax.add_patch(Circle((0, 0), r, fill=False, edgecolor="#e4e4e4", linewidth=0.8, zorder=0))
        if r < range_m:
            ax.text(0.5, r, f"{r} m", fontsize=6, color="#b0b0b0", ha="left", va="bottom", zorder=0)
    ax.plot([-range_m, range_m], [0, 0], color="#f0f0f0", linewidth=0.8, zorder=0)
    ax.plot([0, 0], [-range_m, range_m], color="#f0f0f0", linewidth=0.8, zorder=0)


def _ego(ax) -> None:
    from matplotlib.patches import Polygon

    lwh = np.array([EGO_LWH])
    corners = Boxes(np.array([[EGO_CENTER_X, 0.0, 0.0]]), lwh, np.zeros(1), np.zeros((1, 2)), np.zeros(1)).corners()
    ax.add_patch(Polygon(_uv(corners[0, :4, :2]), closed=True, facecolor=EGO_COLOR, edgecolor=EGO_COLOR, zorder=5))
    ax.annotate(
        "",
        xy=(0, EGO_CENTER_X + 4.0),
        xytext=(0, EGO_CENTER_X),
        arrowprops=dict(arrowstyle="-|>", color=EGO_COLOR, lw=1.2),
        zorder=5,
    )


def _boxes(ax, boxes: Boxes, filled: bool, faint: bool = False) -> None:
    from matplotlib.collections import LineCollection, PolyCollection

    if not len(boxes):
        return
    colors = [class_color(int(c)) for c in boxes.label]
    corners = boxes.corners()[:, :4, :2]
    polys = _uv(corners)
    if filled:
        faces = PolyCollection(polys, facecolors=colors, edgecolors="none", alpha=GT_ALPHA, zorder=2)
        ax.add_collection(faces)
        edges = PolyCollection(polys, facecolors="none", edgecolors=colors, linewidths=1.0, zorder=3)
    else:
        style = dict(linewidths=1.2, linestyles=":", alpha=0.6) if faint else dict(linewidths=1.8, linestyles="--")
        edges = PolyCollection(polys, facecolors="none", edgecolors=colors, zorder=4, **style)
    ax.add_collection(edges)
    center = boxes.center[:, :2]
    front = corners[:, [0, 3]].mean(axis=1)  # corners 0 and 3: the front face's bottom corners
    ticks = np.stack([_uv(center), _uv(front)], axis=1)
    width = 1.0 if filled or faint else 1.8
    ax.add_collection(LineCollection(ticks, colors=colors, linewidths=width, alpha=0.6 if faint else 1.0, zorder=4))
    moving = np.linalg.norm(boxes.velocity, axis=1) > 0.2
    if moving.any():
        start = _uv(center[moving])
        delta = _uv(boxes.velocity[moving] * VELOCITY_SECONDS)
        ax.quiver(
            start[:, 0],
            start[:, 1],
            delta[:, 0],
            delta[:, 1],
            color=[c for c, mv in zip(colors, moving) if mv],
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.0025 if filled else 0.0035,
            headwidth=4,
            headlength=5,
            zorder=4,
        )


def _scores(ax, boxes: Boxes) -> None:
    import matplotlib.patheffects as pe

    halo = [pe.withStroke(linewidth=2.5, foreground="white")]
    for center, label, score in zip(boxes.center, boxes.label, boxes.score):
        u, v = _uv(center[:2])
        ax.text(
            u + 1.2, v + 1.2, f"{score:.2f}", fontsize=7, color=class_color(int(label)), path_effects=halo, zorder=6
        )


def _legend(fig, gt: Boxes, pred: Boxes, extra: list, anchor: tuple[float, float]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    present = sorted({int(c) for c in np.concatenate([gt.label, pred.label]) if 0 <= c < len(CLASSES)})
    handles = [Patch(facecolor=CLASS_COLORS[CLASSES[c]], edgecolor="none", label=CLASSES[c]) for c in present]
    handles += [
        Patch(facecolor="#9e9e9e", alpha=GT_ALPHA + 0.15, edgecolor="#555555", label="ground truth"),
        Patch(facecolor="none", edgecolor="#555555", linestyle="--", linewidth=1.5, label="prediction (score)"),
        Line2D([], [], color="#555555", linewidth=1.0, marker=">", markersize=4, label="velocity: 1 s ahead"),
    ]
    for handle, label in extra:
        handle.set_label(label)
        handles.append(handle)
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=8, frameon=False, handlelength=1.8)


# ------------------------------------------------------------------------------------------------------------------
# Layers for what models predict besides boxes.

LAYERS_OVER_BOXES = ("instance_ids", "trajectories", "ego_trajectory")


def _modes(value, scores) -> tuple[np.ndarray, np.ndarray]:
    """(M, T, 2) paths and (M,) scores from (T, 2) or (M, T, 2) and optional scores."""
    paths = np.asarray(value, dtype=np.float64)
    if paths.ndim == 2:
        paths = paths[None]
    s = np.ones(len(paths)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    return paths, s


@bev_layer("map_polylines")
def map_layer(ctx: BevContext, value) -> None:
    """Vectorised map elements: a list of (P, 2|3) polylines (or a (K, P, 2|3) array), coloured by
    `map_labels` (indexing `map_class_names`, default MapTR's), faded by `map_scores` if given."""
    from matplotlib.lines import Line2D

    lines = [np.asarray(p, dtype=np.float64) for p in value]
    labels = np.asarray(ctx.pred.get("map_labels", np.zeros(len(lines))), dtype=np.int64).reshape(-1)
    scores = ctx.pred.get("map_scores")
    scores = np.ones(len(lines)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    names = tuple(ctx.pred.get("map_class_names", MAP_CLASSES))
    thresh = float(ctx.pred.get("map_score_thresh", 0.3))
    used = set()
    for line, label, score in zip(lines, labels, scores):
        if score < thresh or len(line) < 2:
            continue
        uv = _uv(ctx.to_ego(line))
        color = MAP_COLORS[int(label) % len(MAP_COLORS)]
        ctx.ax.plot(uv[:, 0], uv[:, 1], color=color, linewidth=1.6, alpha=float(min(1.0, 0.4 + score)), zorder=1)
        used.add(int(label))
    for label in sorted(used):
        name = names[label] if label < len(names) else f"map {label}"
        ctx.legend.append((Line2D([], [], color=MAP_COLORS[label % len(MAP_COLORS)], linewidth=1.6), name))


@bev_layer("instance_ids")
def track_layer(ctx: BevContext, value) -> None:
    """Track ids of the drawn predictions, and each id's trail through the frames rendered before
    (`tracks`: ego-frame centres, oldest first)."""
    ids = np.asarray(value).reshape(-1)
    for rank, i in enumerate(ctx.shown):
        tid = int(ids[i])
        if tid < 0:
            continue
        color = class_color(int(ctx.boxes.label[i]))
        trail = ctx.tracks.get(tid)
        if trail is not None and len(trail):
            pts = _uv(np.concatenate([trail[:, :2], ctx.boxes.center[i : i + 1, :2]]))
            ctx.ax.plot(pts[:, 0], pts[:, 1], color=color, linewidth=1.0, alpha=0.7, marker=".", markersize=2, zorder=3)
        if rank < ctx.labels:
            u, v = _uv(ctx.boxes.center[i, :2])
            ctx.ax.text(u - 1.2, v - 3.0, f"#{tid}", fontsize=6, color=color, ha="right", zorder=6)


@bev_layer("trajectories")
def trajectory_layer(ctx: BevContext, value) -> None:
    """Forecast paths of the drawn predictions: per box (T, 2) or (M, T, 2) future positions in the box
    frame, the best mode (by `trajectory_scores`) solid, the others faint."""
    from matplotlib.lines import Line2D

    trajs = np.asarray(value, dtype=np.float64)
    all_scores = ctx.pred.get("trajectory_scores")
    for i in ctx.shown:
        paths, scores = _modes(trajs[i], None if all_scores is None else np.asarray(all_scores)[i])
        best = int(np.argmax(scores))
        color = class_color(int(ctx.boxes.label[i]))
        for m, path in enumerate(paths):
            pts = _uv(np.concatenate([ctx.boxes.center[i : i + 1, :2], ctx.to_ego(path)]))
            alpha, width = (0.9, 1.4) if m == best else (0.25, 0.8)
            ctx.ax.plot(pts[:, 0], pts[:, 1], color=color, linewidth=width, alpha=alpha, zorder=3)
    if len(ctx.shown):
        ctx.legend.append((Line2D([], [], color="#555555", linewidth=1.4), "forecast (best mode)"))


@bev_layer("ego_trajectory")
def plan_layer(ctx: BevContext, value) -> None:
    """The ego's planned path: (T, 2) or (M, T, 2) positions in the box frame (best of
    `ego_trajectory_scores` solid)."""
    from matplotlib.lines import Line2D

    paths, scores = _modes(value, ctx.pred.get("ego_trajectory_scores"))
    best = int(np.argmax(scores))
    for m, path in enumerate(paths):
        pts = _uv(np.concatenate([np.zeros((1, 2)), ctx.to_ego(path)]))
        alpha, width = (1.0, 2.4) if m == best else (0.3, 1.0)
        style = dict(color=PLAN_COLOR, linewidth=width, alpha=alpha, marker="o", markersize=2.5, zorder=7)
        ctx.ax.plot(pts[:, 0], pts[:, 1], **style)
    ctx.legend.append((Line2D([], [], color=PLAN_COLOR, linewidth=2.4, marker="o", markersize=2.5), "ego plan"))
