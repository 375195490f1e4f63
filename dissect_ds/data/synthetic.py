"""A procedural captioned-image set with ground-truth noisy correspondences.

Every image shows exactly one coloured shape (the *object*: one of 8 colours x 6 shapes,
the 48 zero-shot classes) in one of 3 sizes at one of 9 grid positions on a dark, grey
or light background, sometimes with grey clutter strokes that no caption names. So each
image has one unambiguous label, and a caption naming colour, size, shape, position and
background ("a small red circle in the top left on a dark background") is true of exactly
the images with that attribute tuple.

Clean pairs come in graded difficulty: small objects, low contrast against the
background, clutter, and colour-shape combinations that are rare in train. A noisy pair
carries the caption of another noisy image (a derangement of the captions of the noisy
subset).

Val is clean and balanced: the 48 classes in turn (counts differ by at most one), rare
combinations as common as the others, and no two val images share an attribute tuple, so
every val caption (always the full description) is distinct and true of its own image
only (:func:`check_val_captions`); retrieval's ceiling is 1.0. That caps val at
48 x 81 = 3,888 pairs.

JSON per pair: ``{"uid", "noisy", "label", "difficulty", "attrs"}``. label = index of
"<colour> <shape>" in :func:`classnames`; difficulty = number of hardness factors
present (small, low contrast, clutter, rare combination); attrs = [colour, shape, size,
position, background]. Train uids are 0..N-1; val has its own uids 0..V-1.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dissect_ds.data.pipeline import TEMPLATES_FILE
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
SIZES = {"small": 0.10, "medium": 0.15, "large": 0.21}  # radius / image side
SIZE_PROBS = (0.3, 0.4, 0.3)
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
# Background shade name -> grey level range (gaps between them keep the name unambiguous).
BACKGROUNDS = {"dark": (45, 85), "grey": (110, 150), "light": (175, 215)}
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
LOW_CONTRAST_MIX = 0.4  # share of the object's colour left after blending into the background
HARD_CONTRAST = 50  # mean |object - background| per channel below which an object is hard
CLUTTER_PROB = 0.3
CLASS_ONLY_CAPTIONS = 0.75  # share of train captions naming only colour and shape
ZEROSHOT_TEMPLATES = ("a photo of a {c}.",)  # the class-only captions' wording
_SUPERSAMPLE = 4
MAX_VAL = len(COLORS) * len(SHAPES) * len(SIZES) * len(CELLS) * len(BACKGROUNDS)


def classnames() -> list[str]:
    """The zero-shot classes: "<colour> <shape>", label = colour index * 6 + shape index."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def caption_text() -> str:
    """Every word of the set's captions, class names and zero-shot prompts, in one text: what a
    tokenizer for this set must cover (``dissect_ds.model.bpe_subset``)."""
    cells = [*CELLS, *(f"on a {b} background" for b in BACKGROUNDS)]
    prompts = [t.format(c=c) for t in ZEROSHOT_TEMPLATES for c in classnames()]
    return " ".join(["a photo of an", *SIZES, *cells, *prompts])


@dataclass
class _Scene:
    color: str
    shape: str
    size: str
    cell: int
    background: str
    bg_rgb: tuple[int, int, int]
    rgb: tuple[int, int, int]
    offset: tuple[float, float]  # jitter of the centre, in image sides
    scale: float
    clutter: list[tuple[float, float, float, float, int]]  # strokes x0, y0, x1, y1 (sides), grey level

    @property
    def label(self) -> int:
        return list(COLORS).index(self.color) * len(SHAPES) + SHAPES.index(self.shape)

    @property
    def attrs(self) -> tuple[str, str, str, str, str]:
        return (self.color, self.shape, self.size, CELLS[self.cell], self.background)

    @property
    def difficulty(self) -> int:
        contrast = np.abs(np.array(self.rgb) - np.array(self.bg_rgb)).mean()
        rare = (self.color, self.shape) in RARE
        return int(self.size == "small") + int(contrast < HARD_CONTRAST) + int(bool(self.clutter)) + int(rare)


def _scene(rng: np.random.Generator, color: str, shape: str, size: str, cell: int, background: str) -> _Scene:
    level = int(rng.integers(*BACKGROUNDS[background]))
    bg = tuple(int(np.clip(level + t, 0, 255)) for t in rng.integers(-6, 7, size=3))
    base = np.array(COLORS[color]) + rng.integers(-12, 13, size=3)
    if rng.random() < LOW_CONTRAST_PROB:
        base = np.array(bg) + LOW_CONTRAST_MIX * (base - np.array(bg))
    clutter = []
    if rng.random() < CLUTTER_PROB:
        for _ in range(int(rng.integers(1, 4))):
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0.05, 0.95, size=4))
            grey = int(np.clip(level + rng.choice([-1, 1]) * rng.integers(35, 60), 0, 255))
            clutter.append((x0, y0, x1, y1, grey))
    return _Scene(
        color=color,
        shape=shape,
        size=size,
        cell=cell,
        background=background,
        bg_rgb=bg,
        rgb=tuple(int(v) for v in np.clip(base, 0, 255)),
        offset=tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=2)),
        scale=float(rng.uniform(0.92, 1.08)),
        clutter=clutter,
    )


def _train_scenes(n: int, rng: np.random.Generator) -> list[_Scene]:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    weights = np.array([RARE_WEIGHT if cs in RARE else 1.0 for cs in combos])
    out = []
    for _ in range(n):
        color, shape = combos[int(rng.choice(len(combos), p=weights / weights.sum()))]
        size = str(rng.choice(list(SIZES), p=SIZE_PROBS))
        cell = int(rng.integers(len(CELLS)))
        background = str(rng.choice(list(BACKGROUNDS)))
        out.append(_scene(rng, color, shape, size, cell, background))
    return out


def _val_scenes(n: int, rng: np.random.Generator) -> list[_Scene]:
    """Balanced over the classes (a fresh class permutation per 48 images); each class's
    (size, position, background) drawn without replacement, so attribute tuples are unique."""
    if n > MAX_VAL:
        raise ValueError(f"val_samples: at most {MAX_VAL} (distinct captions), got {n}")
    combos = [(c, s) for c in COLORS for s in SHAPES]
    rest = [(z, p, b) for z in SIZES for p in range(len(CELLS)) for b in BACKGROUNDS]
    pools = [list(rng.permutation(len(rest))) for _ in combos]
    out = []
    while len(out) < n:
        for k in rng.permutation(len(combos))[: n - len(out)]:
            size, cell, background = rest[pools[k].pop()]
            out.append(_scene(rng, *combos[k], size, cell, background))
    return out


def _phrase(scene: _Scene, with_size: bool) -> str:
    words = ([scene.size] if with_size else []) + [scene.color, scene.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def full_caption(scene: _Scene) -> str:
    """Every attribute: true of exactly the images with this attribute tuple."""
    return f"{_phrase(scene, True)} {CELLS[scene.cell]} on a {scene.background} background"


def _train_caption(scene: _Scene, rng: np.random.Generator) -> str:
    """Three captions in four name only colour and shape; the rest add size and position,
    or every attribute. Where more attributes are named, a batch's pairs can be told apart
    by colour, position and background alone, and shape (the hard half of the class) is
    learned late: with half the captions class-only, a small ViT reached zero-shot top-1
    of about 0.3 where three in four take it past 0.5 (see docs/bench/accuracy.md)."""
    if rng.random() < CLASS_ONLY_CAPTIONS:
        return f"a photo of {_phrase(scene, False)}"
    return f"{_phrase(scene, True)} {CELLS[scene.cell]}" if rng.random() < 0.5 else full_caption(scene)


def caption_true_of(caption: str, attrs: Sequence[str]) -> bool:
    """Whether a full caption describes an image with these attributes."""
    color, shape, size, cell, background = attrs
    return caption == full_caption(
        _Scene(color, shape, size, CELLS.index(cell), background, (0, 0, 0), (0, 0, 0), (0, 0), 1.0, [])
    )


def check_val_captions(captions: Sequence[str], attrs: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless the captions are distinct and each is true of its own image
    and of no other (so a retrieval ceiling of 1.0). O(V): a full caption is true of an
    image iff it equals that image's full caption."""
    by_attrs = {tuple(a): i for i, a in enumerate(attrs)}
    if len(by_attrs) != len(attrs) or len(set(captions)) != len(captions):
        raise ValueError("val: two images share an attribute tuple or a caption")
    for i, (cap, a) in enumerate(zip(captions, attrs)):
        if not caption_true_of(cap, a):
            raise ValueError(f"val pair {i}: caption {cap!r} is not true of its image {a}")


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple]:
    step = 360 / len(radii)
    return [
        (
            cx + r * math.cos(math.radians(start_deg + i * step)),
            cy + r * math.sin(math.radians(start_deg + i * step)),
        )
        for i, r in enumerate(radii)
    ]


def _draw(draw: ImageDraw.ImageDraw, s: _Scene, side: int) -> None:
    row, col = divmod(s.cell, 3)
    cx = ((col + 0.5) / 3 + s.offset[0]) * side
    cy = ((row + 0.5) / 3 + s.offset[1]) * side
    r = SIZES[s.size] * s.scale * side
    fill = s.rgb
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        h = 0.88 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif s.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3, -90), fill=fill)
    elif s.shape == "diamond":
        draw.polygon([(cx, cy - 1.1 * r), (cx + 0.8 * r, cy), (cx, cy + 1.1 * r), (cx - 0.8 * r, cy)], fill=fill)
    elif s.shape == "star":
        draw.polygon(_polygon(cx, cy, [1.2 * r, 0.5 * r] * 5, -90), fill=fill)
    elif s.shape == "cross":
        w = 0.36 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {s.shape!r}")


def render(scene: _Scene, image_size: int, rng: np.random.Generator) -> bytes:
    """PNG bytes of `scene` at image_size x image_size (drawn supersampled: clutter under
    the object, plus mild pixel noise)."""
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1, grey in scene.clutter:
        draw.line([(x0 * side, y0 * side), (x1 * side, y1 * side)], fill=(grey,) * 3, width=max(1, side // 20))
    _draw(draw, scene, side)
    small = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    noisy = np.clip(small + rng.normal(0.0, 4.0, size=small.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_split(
    out_dir: str,
    scenes: list[_Scene],
    captions: list[str],
    noise_rate: float,
    rng: np.random.Generator,
    image_size: int,
    shard_size: int,
    progress: bool,
    desc: str,
) -> int:
    num_samples = len(scenes)
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
                    "attrs": list(scene.attrs),
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
    ``output/val`` (val_samples clean pairs, at most :data:`MAX_VAL`; none if 0),
    ``output/classnames.txt`` and the zero-shot prompts
    ``output/zeroshot_classification_templates.txt``. Same arguments, same bytes. Returns counts {"train", "val",
    "noisy"}."""
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate}")
    if num_samples < 1 or val_samples < 0 or image_size < 8 or shard_size < 1:
        raise ValueError("need num_samples >= 1, val_samples >= 0, image_size >= 8, shard_size >= 1")
    if val_samples > MAX_VAL:
        raise ValueError(f"val_samples: at most {MAX_VAL} (one distinct caption per val image), got {val_samples}")
    os.makedirs(output, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    scenes = _train_scenes(num_samples, rng)
    captions = [_train_caption(s, rng) for s in scenes]
    n_noisy = _write_split(
        os.path.join(output, "train"), scenes, captions, noise_rate, rng, image_size, shard_size, progress, "train"
    )
    if val_samples:
        rng = np.random.default_rng([seed, 1])
        scenes = _val_scenes(val_samples, rng)
        captions = [full_caption(s) for s in scenes]
        check_val_captions(captions, [s.attrs for s in scenes])
        _write_split(os.path.join(output, "val"), scenes, captions, 0.0, rng, image_size, shard_size, progress, "val")
    with open(os.path.join(output, "classnames.txt"), "w") as f:
        f.write("\n".join(classnames()) + "\n")
    with open(os.path.join(output, TEMPLATES_FILE), "w") as f:
        f.write("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return {"train": num_samples, "val": val_samples, "noisy": n_noisy}
