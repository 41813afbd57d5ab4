"""SparseDrive's evaluator: detection (mAP/NDS) and tracking (AMOTA) with the devkit, the map's Chamfer
AP and, in stage 2, planning L2 and collision rate, as upstream's `nuscenes_3d_dataset.py` evaluates.

Each rank keeps its frames' decoded outputs by sample token (`SparseDrive.predict`); rank 0 scores
them against the prepared split's records. Planning metrics count only frames whose ground truth has a
full 3 s future (upstream skips the others); with none, they are NaN.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from raydrive.eval.detection import NuScenesDetectionEvaluator, evaluate, format_table

DETECTION_KEYS = ("boxes", "scores", "labels", "instance_ids", "cls_scores")
MAP_KEYS = ("map_polylines", "map_scores", "map_labels")
PLAN_KEYS = ("trajectories", "trajectory_scores", "ego_trajectory")


class SparseDriveEvaluator(NuScenesDetectionEvaluator):
    """The evaluator seam for SparseDrive; `headline` follows the stage's tasks."""

    def __init__(self, prepared: str, dataroot: str | None = None, split: str = "val", with_plan: bool = True):
        super().__init__(prepared, dataroot, split, frame="lidar")
        self.with_plan = with_plan
        self.headline = ("mAP", "NDS", "amota", "map_mAP") + (("L2_avg", "collision_avg") if with_plan else ())

    def process(self, batch: dict, outputs: list[dict]) -> None:
        keys = DETECTION_KEYS + MAP_KEYS + (PLAN_KEYS if self.with_plan else ())
        for token, out in zip(batch["token"], outputs):
            self.predictions[token] = {k: np.asarray(out[k]) for k in keys if k in out}

    def evaluate(self, states: list[dict[str, dict]]) -> dict:
        from raydrive.data.parquet import read_split, table_to_records
        from raydrive.data.prepare import load_manifest
        from raydrive.data.sparsedrive_fields import map_annos_from_columns
        from raydrive.eval.map_ap import map_ap
        from raydrive.eval.planning import planning_gt, planning_metrics
        from raydrive.eval.tracking import evaluate_tracking

        predictions = {k: v for part in states for k, v in part.items()}
        manifest = load_manifest(self.prepared)
        records = table_to_records(read_split(Path(self.prepared) / "infos" / self.split))
        dataroot = self.dataroot or manifest["dataroot"]
        version = manifest["version"]
        out_dir = tempfile.mkdtemp(prefix="raydrive-eval-")
        metrics = evaluate(predictions, records, dataroot, version, self.split, output_dir=out_dir)
        metrics.update(evaluate_tracking(predictions, records, dataroot, version, self.split, output_dir=out_dir))
        scored = [r for r in records if r["token"] in predictions]
        map_preds = [
            {
                "vectors": predictions[r["token"]]["map_polylines"],
                "scores": predictions[r["token"]]["map_scores"],
                "labels": predictions[r["token"]]["map_labels"],
            }
            for r in scored
        ]
        metrics.update(map_ap(map_preds, [map_annos_from_columns(r) for r in scored]))
        if self.with_plan:
            plans = [predictions[r["token"]]["ego_trajectory"] for r in scored]
            metrics.update(planning_metrics(plans, [planning_gt(r) for r in scored]))
        return metrics

    def format(self, metrics: dict) -> str:
        lines = [format_table(metrics)]
        lines.append(f"AMOTA: {metrics['amota']:.4f}  AMOTP: {metrics['amotp']:.4f}  map mAP: {metrics['map_mAP']:.4f}")
        if self.with_plan:
            l2 = "  ".join(f"L2 {t}: {_show(metrics[f'L2_{t}'])}" for t in ("1s", "2s", "3s"))
            col = "  ".join(f"CR {t}: {_show(metrics[f'collision_{t}'])}" for t in ("1s", "2s", "3s"))
            lines.append(f"{l2}  |  {col}  ({int(metrics.get('num_samples', 0))} frames with a full 3 s future)")
        return "\n".join(lines)


def _show(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
