"""ADE20K SceneParsing classes as data: the 150 names of ``objectInfo150`` (first synonym; id = its Idx column, 0 =
unlabeled) and the stuff / object split that defines BachGAN's foreground.

BachGAN takes its foreground from the sceneparsing kit's ``objectSplit35-115.mat`` (35 stuff classes, 115 object
classes). That file is binary and was not readable where this table was written, so :data:`ADE20K_STUFF` is the
35 amorphous region classes (surfaces, terrain, water, sky, large structures) chosen from the names; it is NOT
confirmed against the .mat. Pass ``foreground_classes=`` to :class:`ADE20KLayoutSet` to use the official list.
"""

from __future__ import annotations

__all__ = ["ADE20K_CLASS_NAMES", "ADE20K_FOREGROUND", "ADE20K_STUFF"]

# objectInfo150 names, Idx 1..150 (index 0 = unlabeled / "other objects", ignored by the benchmark)
ADE20K_CLASS_NAMES = [
    "unlabeled",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",  # 1-10
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",  # 11-20
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",  # 21-30
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",  # 31-40
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",  # 41-49
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",  # 50-58
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",  # 59-67
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",  # 68-76
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",  # 77-86
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",  # 87-94
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",  # 95-104
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",  # 105-112
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",  # 113-123
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",  # 124-132
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",  # 133-142
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",  # 143-150
]

# 35 stuff (background) classes by Idx (unconfirmed against objectSplit35-115.mat, see the module docstring)
ADE20K_STUFF = [1, 2, 3, 4, 5, 6, 7, 10, 12, 14, 17, 18, 22, 26, 27, 29, 30, 35, 47, 49, 52, 53, 54, 55, 60, 61,
                62, 69, 92, 95, 102, 110, 114, 129, 141]
ADE20K_FOREGROUND = [c for c in range(1, 151) if c not in set(ADE20K_STUFF)]

assert len(ADE20K_CLASS_NAMES) == 151 and len(ADE20K_STUFF) == 35 and len(ADE20K_FOREGROUND) == 115
