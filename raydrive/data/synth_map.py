"""Map expansion and CAN bus files for the synthetic nuScenes tree (what SparseDrive's converter reads).

Each synthetic scene's ego drives a constant-turn path; here that path, extended well before and after
the scene, becomes the centre line of a seven-lane road (3.5 m lanes, the ego in the middle one) with
walkways on both sides and pedestrian crossings every 50 m. The files are written in the real formats:

- `maps/expansion/<location>.json` (map version 1.3): the geometric layers (`node`, `line`, `polygon`)
  and the records `NuScenesMap` loads (`drivable_area`, `road_segment`, `road_block`, `lane` with its
  divider segments, `ped_crossing`, `walkway`, `road_divider`, `lane_divider`, `arcline_path_3`,
  `connectivity`, empty stop lines, car parks, traffic lights and lane connectors). Road pieces share
  their nodes, so the union of road segments and lanes is one clean strip whose contour gives the two
  road boundaries SparseDrive learns.
- `can_bus/<scene>_pose.json` (50 Hz) and `<scene>_steeranglefeedback.json` (100 Hz), the two CAN
  messages SparseDrive's `ego_status` reads, from the same kinematics as the ego poses.

Objects that `synth` places up to about 12 m beside the ego stand on the road; farther ones stand on the
walkways. Nothing here draws from the synthesiser's random generator, so adding the map leaves every
other file of the tree unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from raydrive.data import geometry as geo

MAP_VERSION = "1.3"
LANE_WIDTH = 3.5
NUM_LANES = 7  # the ego's lane is the middle one
HALF_ROAD = LANE_WIDTH * NUM_LANES / 2
WALKWAY_WIDTH = 4.0
NODE_SPACING = 1.0  # metres between polyline nodes along the road
PIECE_NODES = 30  # a road segment / lane record covers this many node spacings
ROAD_MARGIN = 65.0  # road before the first and after the last ego pose (patch reach ~34 m); not a piece multiple
CROSSING_SPACING = 50.0
CROSSING_DEPTH = 4.0
# Left-hand traffic in Singapore: the oncoming lanes are on the ego's right; in Boston on its left.
ONCOMING_LANES = 2
LEFT_HAND_TRAFFIC = ("singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown")
# CAN bus
POSE_RATE_HZ = 50
STEER_RATE_HZ = 100
WHEELBASE = 2.588  # Renault Zoe, the nuScenes car
STEERING_RATIO = 15.0  # steering-wheel angle per road-wheel angle (assumed)
GRAVITY = 9.81
CAN_MARGIN_S = 1.0


class SceneLike(Protocol):
    """What this module reads from a synthetic scene (`synth._Scene`)."""

    index: int
    n_samples: int
    t0_us: int
    ego_start: np.ndarray
    ego_yaw0: float
    ego_speed: float
    ego_yaw_rate: float


def _token(*parts: object) -> str:
    return hashlib.md5("/".join(["map", *(str(p) for p in parts)]).encode()).hexdigest()


@dataclass(frozen=True)
class Road:
    """A constant-curvature road centre line `s -> (x, y, heading)` for `s` in [s_min, s_max] metres."""

    key: str  # unique per road within a map; part of every token
    x0: float
    y0: float
    yaw0: float
    curvature: float  # 1/m, positive turns left
    s_min: float
    s_max: float
    left_hand_traffic: bool = False
    crossing_phase: float = 15.0  # s of one crossing; the others are CROSSING_SPACING apart

    def heading(self, s: np.ndarray) -> np.ndarray:
        return self.yaw0 + self.curvature * np.asarray(s, dtype=np.float64)

    def point(self, s: np.ndarray, offset: float = 0.0) -> np.ndarray:
        """(N, 2) points at arc lengths `s`, `offset` metres to the left of the centre line."""
        s = np.asarray(s, dtype=np.float64)
        h = self.heading(s)
        k = self.curvature
        if abs(k) < 1e-12:
            x = self.x0 + s * math.cos(self.yaw0)
            y = self.y0 + s * math.sin(self.yaw0)
        else:
            x = self.x0 + (np.sin(h) - math.sin(self.yaw0)) / k
            y = self.y0 - (np.cos(h) - math.cos(self.yaw0)) / k
        return np.stack([x - offset * np.sin(h), y + offset * np.cos(h)], axis=-1).reshape(-1, 2)

    def grid(self) -> np.ndarray:
        """Node arc lengths: NODE_SPACING apart, a whole number of pieces long."""
        n_pieces = max(1, math.ceil((self.s_max - self.s_min) / (NODE_SPACING * PIECE_NODES)))
        return self.s_min + NODE_SPACING * np.arange(n_pieces * PIECE_NODES + 1)

    def crossings(self) -> list[float]:
        """Arc lengths of the pedestrian crossings that lie wholly on the road."""
        lo, hi = self.s_min + CROSSING_DEPTH, self.s_max - CROSSING_DEPTH
        first = self.crossing_phase + CROSSING_SPACING * math.ceil((lo - self.crossing_phase) / CROSSING_SPACING)
        return [float(s) for s in np.arange(first, hi, CROSSING_SPACING)]

    def edge_offsets(self) -> np.ndarray:
        """Lateral offsets of the NUM_LANES + 1 lane edges, right to left."""
        return -HALF_ROAD + LANE_WIDTH * np.arange(NUM_LANES + 1)

    def road_divider_edge(self) -> int:
        """Index of the lane edge between the ego's direction and the oncoming lanes."""
        return ONCOMING_LANES if self.left_hand_traffic else NUM_LANES - ONCOMING_LANES

    def lane_forward(self, lane: int) -> bool:
        """Whether lane `lane` (0 = rightmost) runs in the ego's direction."""
        edge = self.road_divider_edge()
        return lane >= edge if self.left_hand_traffic else lane < edge


def road_for_scene(scene: SceneLike, location: str, sample_period_s: float = 0.5) -> Road:
    """The road under one synthetic scene's ego path, long enough for every map patch of the scene."""
    length = scene.ego_speed * (scene.n_samples - 1) * sample_period_s
    return Road(
        key=f"scene{scene.index}",
        x0=float(scene.ego_start[0]),
        y0=float(scene.ego_start[1]),
        yaw0=float(scene.ego_yaw0),
        curvature=float(scene.ego_yaw_rate / scene.ego_speed),
        s_min=-ROAD_MARGIN,
        s_max=length + ROAD_MARGIN,
        left_hand_traffic=location in LEFT_HAND_TRAFFIC,
        crossing_phase=10.0 + 7.0 * (scene.index % 5),
    )


class _MapBuilder:
    """Accumulates the records of one map expansion file."""

    def __init__(self) -> None:
        layers = ("polygon", "line", "node", "drivable_area", "road_segment", "road_block", "lane")
        layers += ("ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider")
        layers += ("traffic_light", "lane_connector")
        self.layers: dict[str, list[dict]] = {name: [] for name in layers}
        self.arcline_path_3: dict[str, list[dict]] = {}
        self.connectivity: dict[str, dict[str, list[str]]] = {}
        self._nodes: set[str] = set()
        self.max_xy = np.zeros(2)

    def node(self, xy: np.ndarray, *key: object) -> str:
        token = _token("node", *key)
        if token not in self._nodes:
            self._nodes.add(token)
            self.layers["node"].append({"token": token, "x": float(xy[0]), "y": float(xy[1])})
            self.max_xy = np.maximum(self.max_xy, xy)
        return token

    def line(self, node_tokens: list[str], *key: object) -> str:
        token = _token("line", *key)
        self.layers["line"].append({"token": token, "node_tokens": node_tokens})
        return token

    def polygon(self, node_tokens: list[str], *key: object) -> str:
        token = _token("polygon", *key)
        self.layers["polygon"].append({"token": token, "exterior_node_tokens": node_tokens, "holes": []})
        return token

    def to_json(self) -> dict:
        canvas = [float(math.ceil(v / 100.0) * 100.0 + 100.0) for v in self.max_xy]
        return {
            "version": MAP_VERSION,
            "canvas_edge": canvas,
            **self.layers,
            "arcline_path_3": self.arcline_path_3,
            "connectivity": self.connectivity,
        }


def _strip(b: _MapBuilder, right: list[str], left: list[str], *key: object) -> str:
    """Polygon between two node chains running in the same direction (right edge forward, left back)."""
    return b.polygon(right + left[::-1], *key)


def _arcline(road: Road, s_a: float, s_b: float, offset: float, forward: bool) -> dict:
    """The devkit's arcline path of a lane centre line: one arc (or straight) in the lane's direction."""
    k = road.curvature
    scale = 1.0 - k * offset  # arc length of the offset line per unit of centre-line arc length
    length = (s_b - s_a) * scale
    start_s, end_s = (s_a, s_b) if forward else (s_b, s_a)
    flip = 0.0 if forward else math.pi
    poses = []
    for s in (start_s, end_s):
        xy = road.point([s], offset)[0]
        yaw = float(road.heading(s)) + flip
        poses.append([float(xy[0]), float(xy[1]), math.atan2(math.sin(yaw), math.cos(yaw))])
    lane_k = (k / scale) * (1.0 if forward else -1.0)
    if abs(lane_k) < 1e-9:
        shape, segments, radius = "LSL", [0.0, length, 0.0], 1e6
    else:
        shape, segments, radius = ("LSL" if lane_k > 0 else "RSR"), [length, 0.0, 0.0], 1.0 / abs(lane_k)
    return {
        "start_pose": poses[0],
        "end_pose": poses[1],
        "shape": shape,
        "radius": radius,
        "segment_length": segments,
    }


def _chain(b: _MapBuilder, road: Road, s: np.ndarray, offset: float, *key: object) -> list[str]:
    """Node tokens of the line `offset` metres left of the centre line, at arc lengths `s`."""
    return [b.node(xy, road.key, *key, i) for i, xy in enumerate(road.point(s, offset))]


def add_road(b: _MapBuilder, road: Road) -> None:
    """Write one road's nodes, lines, polygons and records into the builder."""
    s = road.grid()
    edges = road.edge_offsets()
    rk = road.key
    edge_nodes = [_chain(b, road, s, off, "edge", e) for e, off in enumerate(edges)]
    walk_offsets = (-HALF_ROAD - WALKWAY_WIDTH, HALF_ROAD + WALKWAY_WIDTH)
    walk_nodes = [_chain(b, road, s, off, "walk", w) for w, off in enumerate(walk_offsets)]
    drivable = _token("drivable_area", rk)
    da_polygons: list[str] = []
    n_pieces = (len(s) - 1) // PIECE_NODES
    divider_edge = road.road_divider_edge()
    lane_tokens = [[_token("lane", rk, p, j) for j in range(NUM_LANES)] for p in range(n_pieces)]
    piece_segments: list[str] = []

    for p in range(n_pieces):
        a, z = p * PIECE_NODES, (p + 1) * PIECE_NODES
        sl = slice(a, z + 1)
        seg = _token("road_segment", rk, p)
        piece_segments.append(seg)
        poly = _strip(b, edge_nodes[0][sl], edge_nodes[-1][sl], rk, "road_segment", p)
        da_polygons.append(poly)
        b.layers["road_segment"].append(
            {"token": seg, "polygon_token": poly, "is_intersection": False, "drivable_area_token": drivable}
        )
        # Road blocks: the ego's direction and the oncoming one, each with its travel direction.
        groups = ((0, divider_edge), (divider_edge, NUM_LANES))
        for g, (e0, e1) in enumerate(groups):
            forward = road.lane_forward(e0)
            start, end = (a, z) if forward else (z, a)
            block_poly = _strip(b, edge_nodes[e0][sl], edge_nodes[e1][sl], rk, "road_block", p, g)
            b.layers["road_block"].append(
                {
                    "token": _token("road_block", rk, p, g),
                    "polygon_token": block_poly,
                    "from_edge_line_token": b.line([edge_nodes[e0][start], edge_nodes[e1][start]], rk, "rb_from", p, g),
                    "to_edge_line_token": b.line([edge_nodes[e0][end], edge_nodes[e1][end]], rk, "rb_to", p, g),
                    "road_segment_token": seg,
                }
            )
        for j in range(NUM_LANES):
            _add_lane(b, road, s, edge_nodes, lane_tokens, p, j)
        for w, (inner, outer) in enumerate(((edge_nodes[0], walk_nodes[0]), (edge_nodes[-1], walk_nodes[1]))):
            chains = (outer[sl], inner[sl]) if w == 0 else (inner[sl], outer[sl])
            b.layers["walkway"].append(
                {"token": _token("walkway", rk, p, w), "polygon_token": _strip(b, *chains, rk, "walkway", p, w)}
            )
    b.layers["drivable_area"].append({"token": drivable, "polygon_tokens": da_polygons})

    # Dividers run the whole road: long polylines like the real map's divider records.
    for e in range(1, NUM_LANES):
        line = b.line(edge_nodes[e], rk, "divider", e)
        if e == divider_edge:
            seg = piece_segments[len(piece_segments) // 2]
            b.layers["road_divider"].append(
                {"token": _token("road_divider", rk, e), "line_token": line, "road_segment_token": seg}
            )
        else:
            segments = [{"node_token": t, "segment_type": "DOUBLE_DASHED_WHITE"} for t in edge_nodes[e]]
            b.layers["lane_divider"].append(
                {"token": _token("lane_divider", rk, e), "line_token": line, "lane_divider_segments": segments}
            )

    for c, sc in enumerate(road.crossings()):
        corners = [(sc - CROSSING_DEPTH / 2, -HALF_ROAD), (sc + CROSSING_DEPTH / 2, -HALF_ROAD)]
        corners += [(sc + CROSSING_DEPTH / 2, HALF_ROAD), (sc - CROSSING_DEPTH / 2, HALF_ROAD)]
        nodes = [b.node(road.point([cs], off)[0], rk, "crossing", c, i) for i, (cs, off) in enumerate(corners)]
        piece = min(int((sc - road.s_min) // (NODE_SPACING * PIECE_NODES)), n_pieces - 1)
        b.layers["ped_crossing"].append(
            {
                "token": _token("ped_crossing", rk, c),
                "polygon_token": b.polygon(nodes, rk, "crossing", c),
                "road_segment_token": piece_segments[piece],
            }
        )


def _add_lane(b: _MapBuilder, road: Road, s: np.ndarray, edge_nodes, lane_tokens, p: int, j: int) -> None:
    """One lane record of one road piece, with its arcline path and its links to the next pieces."""
    a, z = p * PIECE_NODES, (p + 1) * PIECE_NODES
    sl = slice(a, z + 1)
    rk = road.key
    forward = road.lane_forward(j)
    right, left = edge_nodes[j][sl], edge_nodes[j + 1][sl]
    if not forward:  # the travel direction decides which edge is the lane's left
        right, left = left[::-1], right[::-1]
    token = lane_tokens[p][j]
    marking = "DOUBLE_DASHED_WHITE"
    b.layers["lane"].append(
        {
            "token": token,
            "polygon_token": _strip(b, edge_nodes[j][sl], edge_nodes[j + 1][sl], rk, "lane", p, j),
            "lane_type": "CAR",
            "from_edge_line_token": b.line([right[0], left[0]], rk, "lane_from", p, j),
            "to_edge_line_token": b.line([right[-1], left[-1]], rk, "lane_to", p, j),
            "left_lane_divider_segments": [{"node_token": t, "segment_type": marking} for t in left],
            "right_lane_divider_segments": [{"node_token": t, "segment_type": marking} for t in right],
        }
    )
    offset = float(road.edge_offsets()[j] + LANE_WIDTH / 2)
    b.arcline_path_3[token] = [_arcline(road, float(s[a]), float(s[z]), offset, forward)]
    n_pieces = len(lane_tokens)
    nxt, prv = (p + 1, p - 1) if forward else (p - 1, p + 1)
    b.connectivity[token] = {
        "incoming": [lane_tokens[prv][j]] if 0 <= prv < n_pieces else [],
        "outgoing": [lane_tokens[nxt][j]] if 0 <= nxt < n_pieces else [],
    }


def map_expansion(roads: list[Road]) -> dict:
    """The map expansion JSON object holding `roads`."""
    b = _MapBuilder()
    for road in roads:
        add_road(b, road)
    return b.to_json()


def write_map_expansion(dataroot: Path, location: str, roads: list[Road]) -> Path:
    """Write `maps/expansion/<location>.json` under `dataroot`; return its path."""
    path = Path(dataroot) / "maps" / "expansion" / f"{location}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(map_expansion(roads)))
    return path


def write_scene_maps(dataroot: Path, scenes_by_location: dict[str, list[SceneLike]]) -> list[Path]:
    """One map expansion per location holding the roads of its scenes (what `synthesize` calls)."""
    return [
        write_map_expansion(dataroot, loc, [road_for_scene(sc, loc) for sc in scenes])
        for loc, scenes in scenes_by_location.items()
        if scenes
    ]


def _can_times(scene: SceneLike, rate_hz: int, sample_period_s: float) -> np.ndarray:
    """Message times (s after the scene's first key frame) covering the scene and a margin around it."""
    end = (scene.n_samples - 1) * sample_period_s + CAN_MARGIN_S
    return np.arange(-CAN_MARGIN_S, end + 1e-9, 1.0 / rate_hz)


def can_bus_messages(scene: SceneLike, sample_period_s: float = 0.5) -> dict[str, list[dict]]:
    """The `pose` and `steeranglefeedback` CAN messages of one scene's constant-turn ego.

    Ego frame: x forward, y left. Velocity (v, 0, 0), rotation rate (0, 0, w), acceleration the
    centripetal v*w sideways plus gravity on z as an IMU reads it; the steering-wheel angle
    (positive left) is the bicycle model's road-wheel angle times STEERING_RATIO.
    """
    v, w = float(scene.ego_speed), float(scene.ego_yaw_rate)
    pose_msgs = []
    for t in _can_times(scene, POSE_RATE_HZ, sample_period_s):
        h = scene.ego_yaw0 + w * t
        if abs(w) < 1e-9:
            dx, dy = v * t * math.cos(scene.ego_yaw0), v * t * math.sin(scene.ego_yaw0)
        else:
            dx = v / w * (math.sin(h) - math.sin(scene.ego_yaw0))
            dy = -v / w * (math.cos(h) - math.cos(scene.ego_yaw0))
        pose_msgs.append(
            {
                "utime": int(round(scene.t0_us + t * 1e6)),
                "pos": [float(scene.ego_start[0] + dx), float(scene.ego_start[1] + dy), 0.0],
                "orientation": geo.yaw_to_quat(h).tolist(),
                "vel": [v, 0.0, 0.0],
                "accel": [0.0, v * w, GRAVITY],
                "rotation_rate": [0.0, 0.0, w],
            }
        )
    steer = STEERING_RATIO * math.atan(WHEELBASE * w / v)
    steer_msgs = [
        {"utime": int(round(scene.t0_us + t * 1e6)), "value": steer}
        for t in _can_times(scene, STEER_RATE_HZ, sample_period_s)
    ]
    return {"pose": pose_msgs, "steeranglefeedback": steer_msgs}


def write_can_bus(dataroot: Path, scene_name: str, scene: SceneLike) -> None:
    """`can_bus/<scene_name>_<message>.json` files, where the devkit's `NuScenesCanBus` looks."""
    folder = Path(dataroot) / "can_bus"
    folder.mkdir(parents=True, exist_ok=True)
    for message, records in can_bus_messages(scene).items():
        (folder / f"{scene_name}_{message}.json").write_text(json.dumps(records))
