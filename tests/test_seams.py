"""The seams: a second model registered only here (a tiny conv net, its mapper and a trivial
evaluator) trains and evaluates through the unchanged engine with key-frame sampling; the global
batch holds for any worker count; a two-stage spec runs and resumes by stage; the engine imports no
model and no evaluation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raydrive.config import Batching, DataSection, OptimSection, RunSection, TrainConfig, batching
from raydrive.engine.schedule import lr_factor
from raydrive.spec import KeyFrames, ModelSpec
from raydrive.trainers import register, unregister

HW = (24, 40)


@dataclass
class ToyConfig:
    channels: int = 8


@dataclass
class ToyMapperConfig:
    max_range: float = 30.0


class ToyMapper:
    """Front camera of this and the previous key frame, grey and tiny; target: objects within range."""

    columns = ("cam_data_path", "gt_boxes")
    ragged = {}
    strings = ()

    def __init__(self, cfg: TrainConfig, train: bool):
        self.dataroot = cfg.data.dataroot
        self.max_range = cfg.mapper.max_range

    def _grey(self, path) -> np.ndarray:
        from PIL import Image

        with Image.open(Path(self.dataroot) / str(path)) as im:
            im.draft("L", (HW[1] * 2, HW[0] * 2))
            return np.asarray(im.convert("L").resize((HW[1], HW[0])), dtype=np.float32) / 255.0

    def __call__(self, rows: dict) -> dict:
        imgs, counts, dts = [], [], []
        for i in range(len(rows["token"])):
            imgs.append(np.stack([self._grey(rows["cam_data_path"][i][0]), self._grey(rows["cam_data_path@-1"][i][0])]))
            boxes = np.array([np.asarray(b, dtype=np.float64) for b in rows["gt_boxes"][i]]).reshape(-1, 7)
            counts.append(np.float32((np.linalg.norm(boxes[:, :2], axis=1) <= self.max_range).sum()))
            dts.append(np.float32((int(rows["timestamp"][i]) - int(rows["timestamp@-1"][i])) / 1e6))
        return {"img": np.stack(imgs), "count": np.array(counts), "dt": np.array(dts)}


class ToyNet(nn.Module):
    """The model protocol with no temporal state."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.conv = nn.Conv2d(2, cfg.channels, 3, padding=1)
        self.fc = nn.Linear(cfg.channels + 1, 1)

    def _count(self, batch) -> torch.Tensor:
        x = torch.relu(self.conv(batch["img"])).mean(dim=(2, 3))
        return self.fc(torch.cat([x, batch["dt"][:, None]], dim=1))[:, 0]

    def forward(self, batch):
        return {"loss_count": ((self._count(batch) - batch["count"]) ** 2).mean()}

    @torch.no_grad()
    def predict(self, batch):
        return [{"count": float(c)} for c in self._count(batch)]

    def reset_state(self, slots=None):
        pass

    def temporal_state(self):
        return {}

    def load_temporal_state(self, state):
        pass


class CountEvaluator:
    headline = ("MAE",)

    def __init__(self, cfg: TrainConfig):
        self.errors: dict[str, float] = {}

    def process(self, batch, outputs):
        for token, count, out in zip(batch["token"], batch["count"], outputs):
            self.errors[token] = abs(out["count"] - float(count))

    def state(self):
        return self.errors

    def evaluate(self, states):
        errors = {k: v for part in states for k, v in part.items()}
        return {"MAE": float(np.mean(list(errors.values()))), "frames": len(errors)}

    def format(self, metrics):
        return f"MAE {metrics['MAE']:.3f} over {metrics['frames']} frames"


def toy_preset(lr: float = 1e-2, steps: int = 4, load_from: str | None = None):
    def preset() -> TrainConfig:
        run = RunSection(global_batch=4, batch_size=2, max_steps=steps, checkpoint_every=2, load_from=load_from)
        run = dataclasses.replace(run, max_failures=0, keep_checkpoints=5, log_every=1)
        optim = OptimSection(lr=lr, schedule="cosine", warmup_iters=1)
        data = DataSection(cpus_per_task=0.25)
        return TrainConfig("", "", run, data, optim, ToyConfig(), ToyMapperConfig())

    return preset


TOY = ModelSpec(
    name="toy",
    description="a tiny conv net counting objects (tests only)",
    config_cls=ToyConfig,
    mapper_cls=ToyMapperConfig,
    presets={"a": toy_preset(steps=2), "b": toy_preset(lr=0.0, load_from="stage:a"), "solo": toy_preset(steps=3)},
    build_model=lambda cfg, assets: ToyNet(cfg),
    build_mapper=ToyMapper,
    build_evaluator=CountEvaluator,
    sampling=KeyFrames((-1, 0)),
    stages={"ab": ("a", "b")},
    default_preset="solo",
    embedded_preset="solo",
)


@pytest.fixture
def toy(ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    register(TOY)
    yield TOY
    unregister("toy")


def toy_args(prepared, synth_root, storage, name, *extra):
    from raydrive.launch.train import build_parser

    argv = ["toy", "--prepared", str(prepared), "--dataroot", str(synth_root), "--storage-path", str(storage)]
    return build_parser().parse_intermixed_args([*argv, "--name", name, *extra])


def histories(results) -> dict[int, dict]:
    out = {}
    for _, result in results:
        for _, m in sorted(result.best_checkpoints, key=lambda x: x[1]["step"]):
            out.update({h["step"]: h for h in m.get("history", [])})
    return out


def test_engine_imports_no_model_and_no_evaluation():
    code = (
        "import sys; import raydrive.engine.loop, raydrive.engine.state, raydrive.engine.evaluate, raydrive.spec;"
        "print([m for m in sys.modules if m.startswith(('raydrive.models', 'raydrive.eval', 'raydrive.trainers'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("global_batch", [4, 8])
def test_global_batch_steps_and_lr_do_not_depend_on_the_worker_count(prepared, synth_root, global_batch):
    from raydrive.data.pipeline import FramePipeline, PipelineConfig

    cfg = toy_preset()()
    cfg.data.prepared, cfg.data.dataroot = str(prepared), str(synth_root)
    seen = []
    for world in (1, 2, 4):
        run = dataclasses.replace(cfg.run, global_batch=global_batch, num_workers=world, max_steps=None, epochs=3)
        b = batching(run)
        assert b.world_size * b.batch_size * b.accum_steps == global_batch
        pipe = FramePipeline(PipelineConfig(prepared=str(prepared), batching=b), ToyMapper(cfg, True))
        total = run.epochs * pipe.steps_per_epoch()
        lrs = [cfg.optim.lr * lr_factor(s, total, cfg.optim) for s in range(total)]
        slots = pipe.plan(0).frame.transpose(1, 0, 2).reshape(pipe.steps_per_epoch(), -1)  # (step, global slot)
        seen.append((b.accum_steps, total, lrs, slots))
    assert [s[0] for s in seen] == [global_batch // 2, global_batch // 4, max(1, global_batch // 8)]
    for _, total, lrs, slots in seen[1:]:
        assert total == seen[0][1] and lrs == seen[0][2] and np.array_equal(slots, seen[0][3])
    assert seen[0][1] == 3 * (12 // global_batch)  # 12 train frames


def test_batching_errors_name_the_fix():
    from raydrive.config import ConfigError

    assert batching(RunSection(global_batch=48, batch_size=6), 16) == Batching(16, 3, 1, 48)
    with pytest.raises(ConfigError, match="--batch-size one of"):
        batching(RunSection(global_batch=8, batch_size=3), 1)


@pytest.mark.slow
def test_toy_model_trains_and_evaluates_through_the_engine(toy, prepared, synth_root, tmp_path):
    from raydrive.launch.train import report, resolve_stages, run_stages

    args = toy_args(prepared, synth_root, tmp_path, "solo", "--num-workers", "2", "optim.ema_decay=0.5")
    ((cfg, result),) = run_stages(resolve_stages(args))
    assert result.error is None, result.error
    m = result.metrics
    assert m["finished"] and m["eval_metrics"]["frames"] == 6  # every val frame scored once, over 2 ranks
    assert 0 <= m["MAE"] < 100
    # the weight average (evaluated in place of the weights) is kept in the checkpoint: counter from
    # the schedule's length (3 steps) plus one update per step
    from raydrive.engine import checkpoint as ckpt

    model_state, saved, _ = ckpt.load(Path(result.checkpoint.path))
    assert saved["ema"]["updates"] == 3 + 3
    assert set(saved["ema"]["shadow"]) <= set(model_state)
    hist = histories([(cfg, result)])
    assert sorted(hist) == [1, 2, 3] and all(len(h["tokens"]) == 2 for h in hist.values())
    report(cfg, result)


@pytest.mark.slow
def test_two_workers_equal_one_worker_with_accumulation(toy, prepared, synth_root, tmp_path):
    """Same global batch 4: 2 workers x batch 2 (DDP) and 1 worker x batch 2 x 2 accumulation steps
    give the same global loss per step and the same parameters (the toy has no batch norm, no
    randomness in its forward and a per-sample mean loss)."""
    from raydrive.launch.train import resolve_stages, run_stages

    runs = {}
    for workers in ("2", "1"):
        args = toy_args(prepared, synth_root, tmp_path, f"w{workers}", "--num-workers", workers, "--no-eval")
        results = run_stages(resolve_stages(args))
        assert results[0][1].error is None
        runs[workers] = (histories(results), results[0][1].metrics["param_checksum"])
    two, one = runs["2"][0], runs["1"][0]
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for s in two:
        assert one[s]["loss"] == pytest.approx(two[s]["loss"], rel=1e-5)
        assert one[s]["lr"] == two[s]["lr"]
    assert runs["1"][1] == pytest.approx(runs["2"][1], rel=1e-6)


@pytest.mark.slow
def test_two_stages_in_one_command_and_resume_in_stage_two(toy, prepared, synth_root, tmp_path):
    from raydrive.launch.train import DONE_FILE, resolve_stages, run_stages

    # first call: stage a runs to its end (2 steps < 3), stage b pauses at step 3 of 4
    args = toy_args(prepared, synth_root, tmp_path, "st", "--preset", "ab", "--no-eval", "run.stop_at_step=3")
    cfgs = resolve_stages(args)
    assert [(c.preset, c.run.name) for c in cfgs] == [("a", "st-a"), ("b", "st-b")]
    first = run_stages(cfgs)
    assert [c.preset for c, _ in first] == ["a", "b"]
    (_, res_a), (_, res_b1) = first
    assert res_a.metrics["finished"] and (tmp_path / "st-a" / DONE_FILE).is_file()
    assert not res_b1.metrics.get("finished") and not (tmp_path / "st-b" / DONE_FILE).exists()
    # stage b started from stage a's final checkpoint (its lr is 0: the weights must be a's exactly)
    assert res_b1.metrics["param_checksum"] == pytest.approx(res_a.metrics["param_checksum"], rel=1e-9)

    # second call, same name: stage a is skipped, stage b continues at step 4
    second = run_stages(resolve_stages(toy_args(prepared, synth_root, tmp_path, "st", "--preset", "ab", "--no-eval")))
    assert [c.preset for c, _ in second] == ["b"]
    res_b2 = second[0][1]
    assert res_b2.metrics["finished"] and res_b2.metrics["resumed_from"] == 3
    assert sorted(histories(second)) == [1, 2, 3, 4] and res_b2.metrics["history"][-1]["step"] == 4


class LaneProbe(nn.Module):
    """A temporal model whose state is, per batch slot, the last frame it saw; it records every frame
    that does not continue its slot's lane (outside a planned sequence start)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.last, self.pending, self.broken = None, None, []

    def reset_state(self, slots=None):
        self.last, self.pending = (None, None) if slots is None else (self.last, slots.clone())

    def temporal_state(self):
        return {} if self.last is None else {"last": self.last}

    def load_temporal_state(self, state):
        self.last = state.get("last")

    def forward(self, batch):
        frame = batch["frame"]
        start = self.pending if self.pending is not None else torch.zeros(len(frame), dtype=torch.bool)
        if self.last is None:
            self.broken += [int(f) for f, s in zip(frame, start) if not s]
        else:
            self.broken += [int(f) for f, s, last in zip(frame, start, self.last) if not s and f != last + 1]
        self.last, self.pending = frame.clone(), None
        return {"loss": (self.w * frame.float()).mean()}


def _lane_micro_batches(steps: int) -> list[list[dict]]:
    """4 global slots, 1 worker x batch 2 x 2 micro-batches; slot g plays frames 100 g, 100 g + 1, ...;
    slot 3 starts a new sequence (frame 1000 + t) at step 2."""
    out = []
    for t in range(steps):
        frames = [100 * g + t for g in range(4)]
        starts = [t == 0] * 4
        if t >= 2:
            frames[3], starts[3] = 1000 + t, t == 2
        micro = [
            {"frame": torch.tensor(frames[a * 2 : a * 2 + 2]), "seq_start": torch.tensor(starts[a * 2 : a * 2 + 2])}
            for a in range(2)
        ]
        out.append(micro)
    return out


def test_accumulation_keeps_each_micro_batch_lane_apart():
    from raydrive.engine.loop import Worker
    from raydrive.engine.state import TrainState

    model = LaneProbe()
    w = Worker.__new__(Worker)  # the parts train_step uses
    w.model = w.ddp = model
    w.world, w.amp_dtype, w.scaler, w.ema, w.device = 1, None, None, None, torch.device("cpu")
    w.batching, w.state = Batching(1, 2, 2, 4), TrainState()
    w.cfg = toy_preset()()
    w.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in _lane_micro_batches(5):
        w.train_step(step)
    assert model.broken == []
    assert [s["last"].tolist() for s in w.state.lane_states] == [[4, 104], [204, 1004]]

    # control: the same micro-batches through one shared state break the lanes
    control = LaneProbe()
    for step in _lane_micro_batches(5):
        for batch in step:
            if batch["seq_start"].any():
                control.reset_state(batch["seq_start"])
            control(batch)
    assert control.broken


def test_missing_assets_are_named_then_made(prepared, tmp_path):
    import json
    import shutil

    from raydrive.data.assets import asset_paths, ensure_assets
    from raydrive.data.infos import DataError

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("depth_gt", "pkl"))
    (copy / "anchors" / "nuscenes_kmeans900.npy").unlink()
    with pytest.raises(DataError, match=r"prepared asset missing: det_anchors_900 .*raydrive prepare"):
        asset_paths(copy, ["det_anchors_900"])
    paths = ensure_assets(copy, ["det_anchors_900"])  # what `raydrive train` does before Ray starts
    assert np.load(paths["det_anchors_900"]).shape == (900, 11)
    entry = json.loads((copy / "manifest.json").read_text())["assets"]["det_anchors_900"]
    assert entry["path"] == "anchors/nuscenes_kmeans900.npy" and entry["shape"] == [900, 11]


@pytest.mark.slow
def test_benchmark_times_every_stage(toy, prepared, synth_root, tmp_path):
    """`--benchmark` of a staged preset times each stage on its own (no stage waits for an earlier one's
    checkpoint, none is marked finished)."""
    from raydrive.launch.train import DONE_FILE, resolve_stages, run_stages

    args = toy_args(
        prepared,
        synth_root,
        tmp_path,
        "bm",
        "--preset",
        "ab",
        "--benchmark",
        "run.benchmark_steps=3",
        "run.benchmark_warmup=1",
    )
    results = run_stages(resolve_stages(args))
    assert [c.preset for c, _ in results] == ["a", "b"] and all(r.error is None for _, r in results)
    assert results[1][0].run.load_from is None
    for cfg, _ in results:
        assert (tmp_path / cfg.run.name / "benchmark.json").is_file()
        assert not (tmp_path / cfg.run.name / DONE_FILE).exists()
