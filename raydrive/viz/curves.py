"""Training curves of a run as one PNG, from the TensorBoard event files rank 0 wrote into the run
folder's `tensorboard/` (`raydrive/engine/tensorboard.py` lists the scalars).

A resumed run adds an event file that starts at its first new step; as TensorBoard does, what earlier
files hold from that step on is dropped (an interrupted session's steps after its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PICTURES_DIR = "pictures"
CURVES_FILE = "curves.png"


def _event_files(tb_dir: Path) -> list[Path]:
    def created(p: Path):  # events.out.tfevents.<unix time>.<host>...
        parts = p.name.split(".")
        return (int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0, p.name)

    return sorted(tb_dir.glob("events.out.tfevents.*"), key=created)


def read_scalars(tb_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} sorted by step, over every event file in `tb_dir`."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    data: dict[str, dict[int, float]] = {}
    for path in _event_files(Path(tb_dir)):
        events = []
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    events.append((v.tag, int(event.step), float(v.simple_value)))
                elif v.HasField("tensor") and v.tensor.float_val:
                    events.append((v.tag, int(event.step), float(v.tensor.float_val[0])))
        if not events:
            continue
        first = min(step for _, step, _ in events)
        if first > 0:  # a resumed session: it rewrites everything from its first step on
            for series in data.values():
                for step in [s for s in series if s >= first]:
                    del series[step]
        for tag, step, value in events:
            data.setdefault(tag, {})[step] = value
    out = {}
    for tag, series in data.items():
        if series:
            steps = np.array(sorted(series))
            out[tag] = (steps, np.array([series[s] for s in steps]))
    return out


def _smooth(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """TensorBoard's exponential moving average, debiased."""
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def render_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], title: str = ""):
    """Loss, loss terms, learning rate, gradient norm, throughput (with the data-wait share) and the
    evaluation metrics, as a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(15, 8), dpi=80, facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    fig.subplots_adjust(left=0.05, right=0.95, top=0.9, bottom=0.07, wspace=0.28, hspace=0.32)
    if title:
        fig.suptitle(title, fontsize=13)

    def line(ax, tag, label=None, smooth=False, **kw):
        if tag not in scalars:
            return False
        steps, values = scalars[tag]
        if smooth and len(values) > 5:
            (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=1, **kw)
            style = {k: v for k, v in kw.items() if k != "color"}
            ax.plot(steps, _smooth(values), color=raw.get_color(), linewidth=1.6, label=label or tag, **style)
        else:
            ax.plot(steps, values, linewidth=1.6, label=label or tag, marker="o" if len(values) < 4 else None, **kw)
        return True

    def finish(ax, name, legend=False, log=False):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if log:
            ax.set_yscale("log")
        handles = ax.get_legend_handles_labels()[0]
        if legend and handles:
            ax.legend(fontsize=6 if len(handles) > 6 else 7, loc="best", ncol=2 if len(handles) > 6 else 1)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#999999")

    ax = axes[0, 0]
    line(ax, "loss/total", "total", smooth=True)
    finish(ax, "loss (total; raw and smoothed)")
    ax = axes[0, 1]
    terms = sorted(t for t in scalars if t.startswith("loss/") and t != "loss/total")
    positive = True
    for i, tag in enumerate(terms):  # ten colours, then the next line style
        line(ax, tag, tag.removeprefix("loss/"), smooth=True, linestyle=("-", "--", ":")[i // 10 % 3])
        positive = positive and bool((scalars[tag][1] > 0).all())
    finish(ax, "loss terms (smoothed)", legend=True, log=positive and bool(terms))
    ax = axes[0, 2]
    line(ax, "train/lr", "lr")
    finish(ax, "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes[1, 0]
    line(ax, "train/grad_norm", "grad norm", smooth=True)
    finish(ax, "gradient norm (before clipping)")
    ax = axes[1, 1]
    line(ax, "perf/samples_per_s", "samples/s (global)", smooth=True, color="#1f77b4")
    if "perf/data_wait_fraction" in scalars:
        twin = ax.twinx()
        steps, values = scalars["perf/data_wait_fraction"]
        twin.plot(steps, _smooth(values) * 100, color="#ff7f0e", linewidth=1.2, label="data wait %")
        twin.set_ylabel("data wait (% of step)", fontsize=9, color="#ff7f0e")
        twin.set_ylim(0, 100)
        twin.tick_params(labelsize=8)
    finish(ax, "throughput (samples/s) and data wait")
    ax = axes[1, 2]
    for tag in sorted(t for t in scalars if t.startswith("val/")):
        steps, values = scalars[tag]
        ax.plot(steps, values, marker="o", linewidth=1.6, label=tag.removeprefix("val/"))
        for s, v in zip(steps, values):
            ax.annotate(f"{v:.3f}", (s, v), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    finish(ax, "validation metrics", legend=True)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def write_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """`<run_dir>/pictures/curves.png` (or `out`) from the run's event files; None if it has none."""
    run_dir = Path(run_dir)
    tb_dir = run_dir / "tensorboard"
    scalars = read_scalars(tb_dir) if tb_dir.is_dir() else {}
    if not scalars:
        return None
    out = Path(out) if out else run_dir / PICTURES_DIR / CURVES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    img = render_curves(scalars, title=run_dir.name)
    tmp = out.with_name(out.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(out)
    return out


def pictures_after_training(run_dir: str | Path) -> Path | None:
    """The driver's end of a run: write the curves and say where the run's pictures are. A failure to
    draw is one line on the console, never the run's failure."""
    run_dir = Path(run_dir)
    try:
        curves = write_curves(run_dir)
    except Exception as e:  # noqa: BLE001 (pictures are a convenience; the run's result stands)
        print(f"[raydrive] could not draw the training curves: {type(e).__name__}: {e}", flush=True)
        curves = None
    pictures = run_dir / PICTURES_DIR
    if pictures.is_dir():
        steps = sorted(p.name for p in pictures.iterdir() if p.is_dir())
        shown = ", ".join(steps[-3:]) + ("" if len(steps) <= 3 else f" (of {len(steps)})")
        print(
            f"[raydrive] pictures: {pictures}" + (f" ({CURVES_FILE}; {shown})" if curves else f" ({shown})"), flush=True
        )
    return curves
