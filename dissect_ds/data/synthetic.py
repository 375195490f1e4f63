"""A procedural captioned-image set with ground-truth noisy correspondences.

Images show 1-3 coloured shapes on a grey background at named grid positions; every
clean caption describes what is visible (colour, shape, optionally size, position,
background). Clean pairs come in graded difficulty: small objects, low contrast,
several objects, and colour-shape combinations that are rare in train (uniform in
val). A noisy pair carries the caption of another noisy image (a derangement of the
captions of the noisy subset).

JSON per pair: ``{"uid", "noisy", "label", "difficulty"}``. label = index of the
first-named object's "<colour> <shape>" in :func:`classnames`; difficulty = number of
hardness factors present (any small object, low contrast, each extra object, any rare
combination). Train uids are 0..N-1; val is a separate, always clean set with its own
uids 0..V-1.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dissect_ds.data.writer import ShardWriter, clear_split

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = {"small": 0.07, "medium": 0.11, "large": 0.16}  # radius / image side
SIZE_PROBS = (0.25, 0.5, 0.25)
CELLS = (
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
)
NUM_OBJECT_PROBS = (0.6, 0.3, 0.1)
RARE = frozenset(
    {
        ("blue", "star"),
        ("yellow", "triangle"),
        ("purple", "circle"),
        ("orange", "square"),
        ("green", "cross"),
        ("white", "diamond"),
    }
)
RARE_WEIGHT = 0.08  # relative frequency of a rare combination in train
LOW_CONTRAST_PROB = 0.2
LOW_CONTRAST_MIX = 0.35  # share of the object's colour left after blending into the background
HARD_CONTRAST = 50  # mean |object - background| per channel below which an object is hard
_SUPERSAMPLE = 4


def classnames() -> list[str]:
    """The zero-shot classes: "<colour> <shape>", label = colour index * 6 + shape index."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


@dataclass
class _Object:
    color: str
    shape: str
    size: str
    cell: int
    rgb: tuple[int, int, int]
    offset: tuple[float, float]  # jitter of the centre, in image sides
    scale: float


@dataclass
class _Scene:
    objects: list[_Object]
    background: tuple[int, int, int]
    difficulty: int

    @property
    def label(self) -> int:
        first = self.objects[0]
        return list(COLORS).index(first.color) * len(SHAPES) + SHAPES.index(first.shape)


def _scene(rng: np.random.Generator, rare_weight: float) -> _Scene:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    weights = np.array([rare_weight if cs in RARE else 1.0 for cs in combos])
    n = int(rng.choice(3, p=NUM_OBJECT_PROBS)) + 1
    cells = rng.choice(len(CELLS), size=n, replace=False)
    level = int(rng.integers(60, 200))
    background = tuple(int(np.clip(level + t, 0, 255)) for t in rng.integers(-8, 9, size=3))
    low_contrast = bool(rng.random() < LOW_CONTRAST_PROB)
    objects = []
    for cell in cells:
        color, shape = combos[int(rng.choice(len(combos), p=weights / weights.sum()))]
        base = np.array(COLORS[color]) + rng.integers(-12, 13, size=3)
        if low_contrast:
            base = np.array(background) + LOW_CONTRAST_MIX * (base - np.array(background))
        objects.append(
            _Object(
                color=color,
                shape=shape,
                size=str(rng.choice(list(SIZES), p=SIZE_PROBS)),
                cell=int(cell),
                rgb=tuple(int(v) for v in np.clip(base, 0, 255)),
                offset=tuple(float(v) for v in rng.uniform(-0.04, 0.04, size=2)),
                scale=float(rng.uniform(0.9, 1.1)),
            )
        )
    hard_contrast = any(np.abs(np.array(o.rgb) - np.array(background)).mean() < HARD_CONTRAST for o in objects)
    difficulty = (
        any(o.size == "small" for o in objects)
        + hard_contrast
        + (n - 1)
        + any((o.color, o.shape) in RARE for o in objects)
    )
    return _Scene(objects, background, int(difficulty))


def _phrase(obj: _Object, with_size: bool) -> str:
    words = ([obj.size] if with_size and obj.size != "medium" else []) + [obj.color, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _caption(scene: _Scene, rng: np.random.Generator) -> str:
    with_size = bool(rng.random() < 0.6)
    objs = [_phrase(o, with_size) for o in scene.objects]
    where = [CELLS[o.cell] for o in scene.objects]
    if len(objs) == 1:
        level = sum(scene.background) / 3
        shade = "dark" if level < 100 else "light" if level > 160 else "grey"
        templates = [
            f"{objs[0]} {where[0]}",
            f"a photo of {objs[0]}",
            f"a photo of {objs[0]} {where[0]}",
            f"there is {objs[0]} {where[0]}",
            f"{objs[0]} on a {shade} background",
            objs[0],
        ]
    else:
        placed = [f"{o} {w}" for o, w in zip(objs, where)]

        def join(items: list[str]) -> str:
            return ", ".join(items[:-1]) + " and " + items[-1]

        templates = [join(objs), join(placed), f"a photo of {join(objs)}"]
    return templates[int(rng.integers(len(templates)))]


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple]:
    step = 360 / len(radii)
    return [
        (
            cx + r * math.cos(math.radians(start_deg + i * step)),
            cy + r * math.sin(math.radians(start_deg + i * step)),
        )
        for i, r in enumerate(radii)
    ]


def _draw(draw: ImageDraw.ImageDraw, obj: _Object, side: int) -> None:
    row, col = divmod(obj.cell, 3)
    cx = ((col + 0.5) / 3 + obj.offset[0]) * side
    cy = ((row + 0.5) / 3 + obj.offset[1]) * side
    r = SIZES[obj.size] * obj.scale * side
    fill = obj.rgb
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = 0.88 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3, -90), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - 1.1 * r), (cx + 0.8 * r, cy), (cx, cy + 1.1 * r), (cx - 0.8 * r, cy)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_polygon(cx, cy, [1.2 * r, 0.5 * r] * 5, -90), fill=fill)
    elif obj.shape == "cross":
        w = 0.36 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: _Scene, image_size: int, rng: np.random.Generator) -> bytes:
    """PNG bytes of `scene` at image_size x image_size (drawn supersampled, plus mild
    pixel noise)."""
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, side)
    small = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    noisy = np.clip(small + rng.normal(0.0, 4.0, size=small.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_split(
    out_dir: str,
    num_samples: int,
    noise_rate: float,
    rng: np.random.Generator,
    rare_weight: float,
    image_size: int,
    shard_size: int,
    progress: bool,
    desc: str,
) -> int:
    scenes = [_scene(rng, rare_weight) for _ in range(num_samples)]
    captions = [_caption(s, rng) for s in scenes]
    n_noisy = round(noise_rate * num_samples)
    if n_noisy == 1:
        n_noisy = 2 if num_samples >= 2 else 0  # one caption cannot be swapped with itself
    noisy = np.zeros(num_samples, dtype=bool)
    if n_noisy:
        order = rng.permutation(num_samples)[:n_noisy]
        noisy[order] = True
        originals = [captions[i] for i in order]
        for k, i in enumerate(order):
            captions[i] = originals[(k + 1) % n_noisy]
    clear_split(out_dir)
    info = {"noise_rate": n_noisy / num_samples, "num_noisy": n_noisy}
    with ShardWriter(out_dir, shard_size, extra_info=info) as writer:
        for uid in tqdm(range(num_samples), desc=desc, unit="pair", disable=not progress):
            scene = scenes[uid]
            writer.write(
                uid=uid,
                image=render(scene, image_size, rng),
                image_ext="png",
                caption=captions[uid],
                meta={
                    "noisy": bool(noisy[uid]),
                    "label": scene.label,
                    "difficulty": scene.difficulty,
                },
            )
    return n_noisy


def write_synthetic(
    output: str,
    *,
    num_samples: int,
    noise_rate: float,
    seed: int,
    val_samples: int = 1000,
    image_size: int = 32,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Write ``output/train`` (num_samples pairs, round(noise_rate * N) noisy),
    ``output/val`` (val_samples clean pairs; none if 0) and ``output/classnames.txt``.
    Same arguments, same bytes. Returns counts {"train", "val", "noisy"}."""
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate}")
    if num_samples < 1 or val_samples < 0 or image_size < 8 or shard_size < 1:
        raise ValueError("need num_samples >= 1, val_samples >= 0, image_size >= 8, shard_size >= 1")
    os.makedirs(output, exist_ok=True)
    n_noisy = _write_split(
        os.path.join(output, "train"),
        num_samples,
        noise_rate,
        np.random.default_rng([seed, 0]),
        RARE_WEIGHT,
        image_size,
        shard_size,
        progress,
        "train",
    )
    if val_samples:
        _write_split(
            os.path.join(output, "val"),
            val_samples,
            0.0,
            np.random.default_rng([seed, 1]),
            1.0,
            image_size,
            shard_size,
            progress,
            "val",
        )
    with open(os.path.join(output, "classnames.txt"), "w") as f:
        f.write("\n".join(classnames()) + "\n")
    return {"train": num_samples, "val": val_samples, "noisy": n_noisy}
