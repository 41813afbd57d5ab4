"""Evaluation (nuScenes detection in `detection.py`) and the checks a submission file must pass before
the devkit reads it: the devkit answers a malformed file with an assertion traceback, raydrive with one
line naming the sample token or field and the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

from raydrive.data.infos import DataError

META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
BOX_FIELDS = {"translation": 3, "size": 3, "rotation": 4, "velocity": 2}
MAX_BOXES_PER_SAMPLE = 500  # the devkit's detection_cvpr_2019 limit


def _load(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"results file {path} does not exist; give the results_nusc.json your model wrote")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"results file {path} is not valid JSON ({e}); write it again (json.dump)") from None
    if not isinstance(data, dict):
        raise DataError(f"results file {path} holds a {type(data).__name__}; expected {{'meta': ..., 'results': ...}}")
    return data


def _check_meta(path: Path, data: dict) -> None:
    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise DataError(
            f"results file {path} has no 'meta' object; add "
            f'"meta": {{{", ".join(f"{k!r}: ..." for k in META_KEYS)}}} (the modalities your model used)'
        )
    missing = [k for k in META_KEYS if not isinstance(meta.get(k), bool)]
    if missing:
        raise DataError(f"results file {path}: 'meta' lacks true/false values for {missing}; add them")


def _box_problem(box, token: str) -> str | None:
    from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES, DETECTION_NAMES

    if not isinstance(box, dict):
        return f"a box of sample {token} is a {type(box).__name__}, not an object"
    if box.get("sample_token") != token:
        return f"a box listed under sample {token} has sample_token {box.get('sample_token')!r}"
    for name, n in BOX_FIELDS.items():
        value = box.get(name)
        ok = isinstance(value, list) and len(value) == n
        if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            return f"box of sample {token}: {name!r} must be {n} finite numbers, got {value!r}"
    if box.get("detection_name") not in DETECTION_NAMES:
        return f"box of sample {token}: unknown detection_name {box.get('detection_name')!r} (one of {DETECTION_NAMES})"
    score = box.get("detection_score")
    if not isinstance(score, float) or math.isnan(score):
        return f"box of sample {token}: detection_score must be a float, got {score!r}"
    if box.get("attribute_name", "") not in (*ATTRIBUTE_NAMES, ""):
        return f"box of sample {token}: unknown attribute_name {box.get('attribute_name')!r}"
    return None


def split_tokens(dataroot: str | Path, version: str, eval_set: str) -> set[str]:
    """The sample tokens of a devkit split, from the tables (without loading the whole devkit)."""
    from nuscenes.utils.splits import create_splits_scenes

    tables = Path(dataroot) / version
    try:
        scenes = json.loads((tables / "scene.json").read_text())
        samples = json.loads((tables / "sample.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read the {version} tables under {dataroot} ({e}); check --dataroot and --version"
        ) from None
    splits = create_splits_scenes()
    if eval_set not in splits:
        raise DataError(f"unknown --eval-set {eval_set!r}; one of {sorted(splits)}")
    names = set(splits[eval_set])
    wanted = {s["token"] for s in scenes if s["name"] in names}
    return {s["token"] for s in samples if s["scene_token"] in wanted}


def check_submission(path: str | Path, dataroot: str | Path, version: str, eval_set: str) -> None:
    """Raise DataError with one line unless the devkit can score `path` on `eval_set`: valid JSON with
    'meta' and 'results', every sample of the split and no other, well-formed boxes."""
    path = Path(path)
    data = _load(path)
    _check_meta(path, data)
    results = data.get("results")
    if not isinstance(results, dict):
        raise DataError(f"results file {path} has no 'results' object (sample token -> list of boxes)")
    expected = split_tokens(dataroot, version, eval_set)
    missing, extra = sorted(expected - set(results)), sorted(set(results) - expected)
    if missing or extra:
        what = [f"{len(missing)} of its {len(expected)} samples are missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(extra)} tokens are not in it (e.g. {extra[0]})"] if extra else []
        raise DataError(
            f"results file {path} does not cover split {eval_set} of {version}: {'; '.join(what)}; give every "
            f"sample of the split an entry (an empty list when nothing was detected), or pass the --eval-set "
            f"it was made for"
        )
    for token, boxes in results.items():
        if not isinstance(boxes, list) or len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise DataError(f"results file {path}: sample {token} needs a list of at most {MAX_BOXES_PER_SAMPLE} boxes")
        problem = next((p for p in (_box_problem(b, token) for b in boxes) if p), None)
        if problem:
            raise DataError(f"results file {path}: {problem}; fix the writer of this file")
