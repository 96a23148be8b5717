"""The embedded default layout set: procedurally textured outdoor scenes with coloured foreground objects.

Each scene is one of three types, drawn per image, with a horizon at 30-60 % of the height:

- ``street``: sky, a row of building blocks of varied width and height standing on the horizon, a sidewalk band
  under the horizon, road below it (and sometimes a near sidewalk at the bottom). Cars stand on the road; people,
  trees and signs on a sidewalk; now and then a plane in the sky.
- ``park``: sky over grass, sometimes crossed by a path (sidewalk class). Trees and people on the grass or the path;
  planes in the sky.
- ``harbour``: sky over water (sometimes a distant skyline), sometimes a quay (sidewalk class) at the bottom. Boats
  on the water, people on the quay, planes in the sky.

An object's bottom edge lies in its supporting region and its size grows with its distance below the horizon
(perspective), so the foreground boxes predict the background layout: cars mean road under them and a horizon
above them, boats mean water, planes mean sky. That is the signal BachGAN's retrieval uses.

Objects have class-typical shapes (car body + cabin + wheels, person legs + torso + head, tree trunk + crown, sign
pole + plate, plane fuselage + wing + tail, boat hull + mast + sail) and colours drawn from class palettes;
background classes have their own colour and texture (sky gradient, windowed facades, road with lane dashes,
tiled sidewalk, grassy noise, rippled water) plus per-image brightness jitter and pixel noise. Near objects are
painted over far ones; every object with a visible pixel gets one box, tight around its visible pixels.

Everything is deterministic from (``seed``, split, index): the layout and the appearance use separate random
streams, so :meth:`SyntheticLayoutSet.label_map` draws only the layout. Items are generated on first use (a few ms
each) and cached in memory (uint8: about 16 KiB per 64 x 64 item).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import LayoutSet

__all__ = ["CLASS_NAMES", "FOREGROUND_CLASSES", "SCENE_TYPES", "SyntheticLayoutConfig", "SyntheticLayoutSet",
           "generate_scene"]

CLASS_NAMES = ["sky", "building", "road", "sidewalk", "grass", "water", "car", "person", "tree", "sign", "plane",
               "boat"]
SKY, BUILDING, ROAD, SIDEWALK, GRASS, WATER, CAR, PERSON, TREE, SIGN, PLANE, BOAT = range(12)
FOREGROUND_CLASSES = [CAR, PERSON, TREE, SIGN, PLANE, BOAT]
SCENE_TYPES = ["street", "park", "harbour"]
_SPLITS = {"train": 0, "val": 1}

_CAR_COLOURS = np.array([[200, 30, 30], [30, 60, 190], [230, 200, 40], [235, 235, 235], [30, 30, 30],
                         [150, 150, 160]], dtype=np.float32)
_SHIRT_COLOURS = np.array([[220, 60, 60], [60, 90, 220], [250, 170, 40], [240, 240, 240], [150, 60, 170],
                           [40, 160, 90]], dtype=np.float32)
_FACADE_COLOURS = np.array([[150, 140, 130], [170, 110, 90], [200, 190, 160], [120, 120, 130], [190, 160, 120]],
                           dtype=np.float32)


@dataclass(frozen=True)
class SyntheticLayoutConfig:
    """Knobs of the synthetic layout set (everything deterministic from ``seed``)."""

    seed: int = 0
    size: tuple[int, int] = (64, 64)
    n_train: int = 3000
    n_val: int = 300

    def __post_init__(self) -> None:
        h, w = self.size
        if min(h, w) < 16:
            raise ValueError(f"SyntheticLayoutConfig: argument 'size' must be at least (16, 16), got {self.size}")
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError(f"SyntheticLayoutConfig: n_train and n_val must be >= 1, got {self.n_train}, "
                             f"{self.n_val}")


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


class _Canvas:
    """Pixel-centre grids of an H x W image."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1.0


def _object_parts(cv: _Canvas, cls: int, xc: float, yb: float, w: float, h: float) -> list[tuple[str, np.ndarray]]:
    """The named part masks of one object whose bottom centre is (xc, yb), extent w x h."""
    x0 = xc - w / 2
    if cls == CAR:
        return [("body", cv.rect(x0, yb - 0.65 * h, x0 + w, yb - 0.12 * h)),
                ("window", cv.rect(x0 + 0.22 * w, yb - h, x0 + 0.78 * w, yb - 0.65 * h)),
                ("wheel", cv.ellipse(x0 + 0.22 * w, yb - 0.15 * h, 0.13 * w, 0.17 * h)
                 | cv.ellipse(x0 + 0.78 * w, yb - 0.15 * h, 0.13 * w, 0.17 * h))]
    if cls == PERSON:
        return [("legs", cv.rect(xc - 0.3 * w, yb - 0.45 * h, xc + 0.3 * w, yb)),
                ("shirt", cv.ellipse(xc, yb - 0.6 * h, 0.5 * w, 0.2 * h)),
                ("head", cv.ellipse(xc, yb - 0.88 * h, 0.32 * w, 0.12 * h))]
    if cls == TREE:
        return [("trunk", cv.rect(xc - max(0.1 * w, 0.6), yb - 0.4 * h, xc + max(0.1 * w, 0.6), yb)),
                ("crown", cv.ellipse(xc, yb - 0.65 * h, 0.5 * w, 0.36 * h))]
    if cls == SIGN:
        return [("pole", cv.rect(xc - max(0.08 * w, 0.6), yb - 0.6 * h, xc + max(0.08 * w, 0.6), yb)),
                ("plate", cv.rect(x0, yb - h, x0 + w, yb - 0.55 * h))]
    if cls == PLANE:
        yc = yb - 0.5 * h
        tri = (cv.yy >= yc) & (cv.yy < yc + 0.5 * h) & (np.abs(cv.xx - xc) < 0.22 * w * (1 - (cv.yy - yc) / (0.5 * h)))
        tail = cv.rect(x0, yb - h, x0 + 0.14 * w, yc)
        return [("fuselage", cv.ellipse(xc, yc, 0.5 * w, 0.17 * h) | tail), ("wing", tri)]
    if cls == BOAT:
        top = yb - 0.38 * h
        hull = (cv.yy >= top) & (cv.yy < yb) & (np.abs(cv.xx - xc) < 0.5 * w * (1 - 0.35 * (cv.yy - top) / (0.38 * h)))
        mast_x = xc - 0.05 * w
        sail = ((cv.yy >= yb - h) & (cv.yy < top) & (cv.xx >= mast_x)
                & (cv.xx < mast_x + 0.42 * w * (cv.yy - (yb - h)) / (0.62 * h)))
        return [("hull", hull), ("sail", sail), ("mast", cv.rect(mast_x - 0.6, yb - h, mast_x + 0.6, top))]
    raise ValueError(f"not a foreground class: {cls}")


_SHAPE = {CAR: (0.22, 0.2), PERSON: (0.08, 0.22), TREE: (0.17, 0.34), SIGN: (0.08, 0.2), BOAT: (0.22, 0.26)}


def _layout(rng: np.random.Generator, cv: _Canvas) -> dict:
    """Draw a scene's background regions and objects (no colours)."""
    h, w = cv.h, cv.w
    scene = int(rng.choice(3, p=[0.45, 0.3, 0.25]))
    horizon = int(round(h * rng.uniform(0.3, 0.6)))
    label = np.full((h, w), SKY, dtype=np.uint8)
    buildings: list[tuple[int, int, int]] = []
    supports: dict[int, list[tuple[int, int]]] = {}  # class -> row bands [a, b) objects may stand in
    plan: list[int] = []
    if scene == 0:  # street
        s = min(h - 3, horizon + max(2, int(round(h * rng.uniform(0.08, 0.18)))))
        label[horizon:s] = SIDEWALK
        label[s:] = ROAD
        bands = [(horizon, s)]
        if rng.random() < 0.5:
            r = h - max(2, int(round(h * rng.uniform(0.05, 0.12))))
            if r > s + 4:
                label[r:] = SIDEWALK
                bands.append((r, h))
        road_end = h if len(bands) == 1 else bands[1][0]
        supports = {CAR: [(s + 1, road_end)], PERSON: bands, TREE: [bands[0]], SIGN: bands}
        x = 0
        while x < w:
            bw = max(3, int(round(w * rng.uniform(0.12, 0.35))))
            if rng.random() < 0.85:
                top = max(0, horizon - max(2, int(round(h * rng.uniform(0.12, 0.45)))))
                label[top:horizon, x:x + bw] = BUILDING
                buildings.append((x, min(w, x + bw), top))
            x += bw
        plan = [CAR] * int(rng.integers(1, 4)) + [PERSON] * int(rng.integers(0, 3)) + [TREE] * int(rng.integers(0, 3))
        plan += [SIGN] * int(rng.random() < 0.6) + [PLANE] * int(rng.random() < 0.15)
    elif scene == 1:  # park
        label[horizon:] = GRASS
        bands_grass = [(horizon, h)]
        paths = []
        if rng.random() < 0.5:
            p0 = int(round(horizon + (h - horizon) * rng.uniform(0.3, 0.7)))
            p1 = min(h, p0 + max(2, int(round(h * rng.uniform(0.06, 0.12)))))
            label[p0:p1] = SIDEWALK
            paths = [(p0, p1)]
        supports = {TREE: bands_grass, PERSON: bands_grass + paths}
        plan = [TREE] * int(rng.integers(1, 4)) + [PERSON] * int(rng.integers(0, 3))
        plan += [PLANE] * int(rng.random() < 0.35)
    else:  # harbour
        if rng.random() < 0.5:
            x = 0
            while x < w:
                bw = max(2, int(round(w * rng.uniform(0.08, 0.2))))
                if rng.random() < 0.6:
                    top = max(0, horizon - max(1, int(round(h * rng.uniform(0.04, 0.12)))))
                    label[top:horizon, x:x + bw] = BUILDING
                    buildings.append((x, min(w, x + bw), top))
                x += bw
        label[horizon:] = WATER
        water = [(horizon + 1, h)]
        plan = [BOAT] * int(rng.integers(1, 4)) + [PLANE] * int(rng.random() < 0.5)
        supports = {BOAT: water}
        if rng.random() < 0.6:
            q = h - max(3, int(round(h * rng.uniform(0.1, 0.2))))
            if q > horizon + 4:
                label[q:] = SIDEWALK
                supports = {BOAT: [(horizon + 1, q)], PERSON: [(q, h)]}
                plan += [PERSON] * int(rng.integers(0, 3))
    objects = []
    for cls in plan:
        if cls == PLANE:
            if horizon < 0.25 * h:
                continue
            pw = w * rng.uniform(0.14, 0.28)
            ph = 0.4 * pw
            yb = rng.uniform(ph + 1, max(ph + 1.5, horizon - 0.05 * h))
            objects.append((cls, rng.uniform(pw / 2, w - pw / 2), yb, pw, ph))
            continue
        band = supports[cls][int(rng.integers(len(supports[cls])))]
        yb = rng.uniform(band[0] + 0.5, band[1])
        depth = (yb - horizon) / max(1.0, h - horizon)
        scale = (0.45 + 0.9 * depth) * rng.uniform(0.85, 1.15)
        fw, fh = _SHAPE[cls]
        ow, oh = max(2.0, fw * w * scale), max(3.0, fh * h * scale)
        objects.append((cls, rng.uniform(ow / 2, w - ow / 2), yb, ow, oh))
    objects.sort(key=lambda o: (o[0] != PLANE, o[2]))  # far (higher) objects first; near ones occlude them
    owner = np.full((h, w), -1, dtype=np.int64)
    parts = []
    for k, (cls, xc, yb, ow, oh) in enumerate(objects):
        pk = _object_parts(cv, cls, xc, yb, ow, oh)
        full = np.zeros((h, w), dtype=bool)
        for _, m in pk:
            full |= m
        owner[full] = k
        label[full] = cls
        parts.append(pk)
    boxes = []
    for k, (cls, *_rest) in enumerate(objects):
        ys, xs = np.nonzero(owner == k)
        if len(ys):
            boxes.append([cls, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"scene": scene, "horizon": horizon, "label": label, "buildings": buildings, "objects": objects,
            "parts": parts, "owner": owner, "boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 5)}


# ----------------------------------------------------------------------------------------------------------
# Appearance
# ----------------------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, colour, amount: float = 18.0) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _paint(rng: np.random.Generator, cv: _Canvas, lay: dict) -> np.ndarray:
    h, w = cv.h, cv.w
    label, yy, xx = lay["label"], cv.yy, cv.xx
    img = np.zeros((h, w, 3), dtype=np.float32)
    horizon = max(1, lay["horizon"])
    # sky: vertical gradient
    top, low = _jitter(rng, (110, 160, 225)), _jitter(rng, (195, 215, 240), 12)
    t = np.clip(yy / horizon, 0, 1)[..., None]
    sky = top * (1 - t) + low * t
    img[:] = sky
    # buildings: facade colour + window grid
    bmask = label == BUILDING
    for x0, x1, btop in lay["buildings"]:
        m = cv.rect(x0, btop, x1, horizon) & bmask
        facade = _jitter(rng, _FACADE_COLOURS[int(rng.integers(len(_FACADE_COLOURS)))])
        px, py = int(rng.integers(3, 5)), int(rng.integers(4, 6))
        windows = ((xx.astype(int) - x0) % px == 1) & ((yy.astype(int) - btop) % py == 2)
        img[m] = facade
        img[m & windows] = facade * 0.45 + np.array([40, 50, 70], dtype=np.float32)
    # ground textures
    road = label == ROAD
    img[road] = _jitter(rng, (72, 72, 78), 8) + rng.normal(0, 6, (int(road.sum()), 1)).astype(np.float32)
    if road.any():
        rows = np.nonzero(road.any(1))[0]
        mid = (rows[0] + rows[-1]) // 2
        dash = road & (np.abs(yy - mid - 0.5) < 0.8) & (((xx.astype(int) + int(rng.integers(8))) % 8) < 4)
        img[dash] = (215, 210, 160)
    side = label == SIDEWALK
    tiles = ((xx.astype(int) % 6) == 0) | ((yy.astype(int) % 4) == 0)
    sc = _jitter(rng, (175, 165, 150), 12)
    img[side] = sc
    img[side & tiles] = sc * 0.75
    grass = label == GRASS
    g = _jitter(rng, (70, 140, 55), 15)
    img[grass] = g + rng.normal(0, 14, (int(grass.sum()), 1)).astype(np.float32) * np.array([0.4, 1.0, 0.3],
                                                                                            dtype=np.float32)
    water = label == WATER
    ripple = np.sin(xx * 0.9 + yy * 2.3 + rng.uniform(0, 6.28)) * 14
    img[water] = _jitter(rng, (40, 85, 150), 12) + ripple[water][:, None] * np.array([0.5, 0.7, 1.0],
                                                                                      dtype=np.float32)
    # objects: only their visible pixels (owner == k) are painted, so nearer objects keep covering farther ones
    owner = lay["owner"]
    for k, ((cls, *_), parts) in enumerate(zip(lay["objects"], lay["parts"])):
        vis = owner == k
        if not vis.any():
            continue
        if cls == CAR:
            colours = {"body": _jitter(rng, _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))], 12),
                       "window": _jitter(rng, (150, 190, 215), 10), "wheel": _jitter(rng, (25, 25, 25), 5)}
        elif cls == PERSON:
            colours = {"legs": _jitter(rng, (40, 45, 80), 15),
                       "shirt": _jitter(rng, _SHIRT_COLOURS[int(rng.integers(len(_SHIRT_COLOURS)))], 12),
                       "head": _jitter(rng, (225, 180, 150), 20)}
        elif cls == TREE:
            colours = {"trunk": _jitter(rng, (100, 65, 35), 10), "crown": _jitter(rng, (30, 95, 35), 15)}
        elif cls == SIGN:
            colours = {"pole": _jitter(rng, (120, 120, 125), 10),
                       "plate": _jitter(rng, [(210, 30, 30), (30, 70, 200), (240, 200, 30)][int(rng.integers(3))], 10)}
        elif cls == PLANE:
            colours = {"fuselage": _jitter(rng, (235, 235, 240), 10), "wing": _jitter(rng, (170, 175, 185), 10)}
        else:
            colours = {"hull": _jitter(rng, [(200, 40, 40), (240, 240, 240), (40, 60, 150)][int(rng.integers(3))],
                                       10),
                       "sail": _jitter(rng, (245, 240, 225), 8), "mast": _jitter(rng, (90, 70, 50), 8)}
        for name, m in parts:
            img[m & vis] = colours[name]
    img *= rng.uniform(0.85, 1.1)
    img += rng.normal(0, 4.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_scene(seed: int, split: str, index: int, size: tuple[int, int] = (64, 64),
                   with_image: bool = True) -> dict:
    """One scene: ``label`` uint8 [H, W], ``boxes`` int64 [n, 5], ``scene`` (index into SCENE_TYPES),
    ``horizon`` (row) and, with ``with_image``, ``image`` uint8 [H, W, 3]. Deterministic from the arguments."""
    if split not in _SPLITS:
        raise ValueError(f"generate_scene: argument 'split' must be one of {sorted(_SPLITS)}, got {split!r}")
    cv = _Canvas(int(size[0]), int(size[1]))
    lay = _layout(np.random.default_rng([int(seed), _SPLITS[split], int(index), 0]), cv)
    out = {"label": lay["label"], "boxes": lay["boxes"], "scene": lay["scene"], "horizon": lay["horizon"]}
    if with_image:
        out["image"] = _paint(np.random.default_rng([int(seed), _SPLITS[split], int(index), 1]), cv, lay)
    return out


class SyntheticLayoutSet(LayoutSet):
    """The synthetic layout set (module docstring): ``split`` 'train' (``n_train`` scenes) or 'val' (``n_val``)."""

    num_classes = len(CLASS_NAMES)
    foreground_classes = list(FOREGROUND_CLASSES)
    class_names = list(CLASS_NAMES)

    def __init__(self, split: str = "train", config: SyntheticLayoutConfig | None = None, flip: bool | None = None,
                 cache: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"SyntheticLayoutSet: argument 'split' must be 'train' or 'val', got {split!r}")
        self.config = config or SyntheticLayoutConfig()
        super().__init__(split, self.config.size, flip=flip, seed=self.config.seed)
        self.cache = cache
        self._items: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._scene: dict[int, int] = {}

    def __len__(self) -> int:
        return self.config.n_train if self.split == "train" else self.config.n_val

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if index in self._items:
            return self._items[index]
        s = generate_scene(self.config.seed, self.split, index, self.size)
        item = (s["image"], s["label"].astype(np.int64), s["boxes"])
        self._scene[index] = s["scene"]
        if self.cache:
            self._items[index] = item
        return item

    def label_map(self, index: int) -> np.ndarray:
        if index in self._items:
            return self._items[index][1]
        return generate_scene(self.config.seed, self.split, index, self.size, with_image=False)["label"]

    def scene_type(self, index: int) -> int:
        """The scene type of item ``index`` (an index into :data:`SCENE_TYPES`)."""
        if index not in self._scene:
            self._scene[index] = generate_scene(self.config.seed, self.split, index, self.size,
                                                with_image=False)["scene"]
        return self._scene[index]
