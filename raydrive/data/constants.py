"""nuScenes names and orders that every part of raydrive agrees on.

Camera order and class order follow the upstream converters (Sparse4D, StreamPETR, BEVDepth all use
the same six-camera order and the same ten detection classes).
"""

from __future__ import annotations

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
NUM_CAMS = len(CAMERAS)
LIDAR = "LIDAR_TOP"

# The detection classes, in the order of the upstream configs (label i = CLASSES[i]).
CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)

# nuScenes category -> detection class (the mmdet3d converters' NameMapping). Categories that are
# nuScenes categories but not detection classes keep their raw name and are dropped by the filters.
CATEGORY_TO_CLASS: dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

# Every category of nuScenes v1.0 (the 23 annotated ones): anything else in a tree is an error.
KNOWN_CATEGORIES: frozenset[str] = frozenset(CATEGORY_TO_CLASS) | {
    "animal",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "static_object.bicycle_rack",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
}

# The category the synthetic generator uses for each class.
CLASS_TO_CATEGORY: dict[str, str] = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
}

ATTRIBUTES: tuple[str, ...] = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)

# Attribute a detector reports for a class when the speed rule says nothing more (mmdet3d's
# NuScenesDataset.DefaultAttribute; the same table is in BEVDepth's evaluator).
DEFAULT_ATTRIBUTE: dict[str, str] = {
    "car": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "trailer": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked",
    "bicycle": "cycle.without_rider",
    "barrier": "",
    "traffic_cone": "",
}
MOVING_SPEED = 0.2  # m/s; above it a vehicle is "moving" and a cycle "with_rider"

VISIBILITY_LEVELS: tuple[tuple[str, str], ...] = (
    ("1", "v0-40"),
    ("2", "v40-60"),
    ("3", "v60-80"),
    ("4", "v80-100"),
)

# Which nuScenes split feeds which raydrive split, per version.
VERSION_SPLITS: dict[str, dict[str, str]] = {
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-test": {"test": "test"},
}


def attribute_for(name: str, speed: float) -> str:
    """The usual nuScenes attribute rule for a detection of class `name` moving at `speed` m/s."""
    if speed > MOVING_SPEED:
        if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTE[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[name]


def split_scene_names(version: str) -> dict[str, list[str]]:
    """raydrive split -> scene names, from the devkit's own split lists."""
    from nuscenes.utils.splits import create_splits_scenes

    if version not in VERSION_SPLITS:
        raise ValueError(f"unknown nuScenes version {version!r}; expected one of {sorted(VERSION_SPLITS)}")
    devkit = create_splits_scenes(verbose=False)
    return {ours: list(devkit[theirs]) for ours, theirs in VERSION_SPLITS[version].items()}
