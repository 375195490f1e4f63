"""Small evaluation sets drawn with the synthetic generator, in the layouts real
benchmarks use, so that evaluation and export can be tested offline:

- ``imagefolder/<class>/<i>.png``: one folder per class (the ImageNet val layout);
- ``wds/``: clip_benchmark's ``wds`` layout (``test/nshards.txt``, ``test/0.tar`` with
  ``png`` + ``cls`` samples, ``classnames.txt``, ``zeroshot_classification_templates.txt``);
- ``retrieval/images/<i>.png`` + ``retrieval/annotations.json``: five captions per image
  in the clip_benchmark/BLIP layout of the COCO / Flickr30k Karpathy test splits.

Every image shows one object; a class is "<colour> <shape>". Retrieval images differ
in colour, shape, size or position, and each caption names all four, so it describes
exactly one image.

``python -m dissect_ds.data.evalsets --output DIR`` writes all three.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np

from dissect_ds.data.pipeline import TEMPLATES_FILE
from dissect_ds.data.synthetic import CELLS, COLORS, SHAPES, SIZES, ZEROSHOT_TEMPLATES, _Scene, classnames, render


def _scene(color: str, shape: str, size: str, cell: int, rng: np.random.Generator) -> _Scene:
    """One plainly drawn object (full contrast, no clutter) on a grey background."""
    level = int(rng.integers(110, 150))
    background = tuple(int(level + t) for t in rng.integers(-8, 9, size=3))
    return _Scene(
        color=color,
        shape=shape,
        size=size,
        cell=cell,
        background="grey",
        bg_rgb=background,
        rgb=COLORS[color],
        offset=(0.0, 0.0),
        scale=1.0,
        clutter=[],
    )


def _labelled(
    num_classes: int, per_class: int, seed: int, image_size: int
) -> tuple[list[str], list[tuple[bytes, int]]]:
    """``num_classes`` classes spread over colours and shapes, ``per_class`` PNGs each."""
    rng = np.random.default_rng([seed, 2])
    names = classnames()
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in [1, {len(names)}], got {num_classes}")
    picked = [names[i] for i in np.linspace(0, len(names) - 1, num_classes).round().astype(int)]
    images = []
    for label, name in enumerate(picked):
        color, shape = name.split()
        for _ in range(per_class):
            scene = _scene(color, shape, "large", int(rng.integers(len(CELLS))), rng)
            images.append((render(scene, image_size, rng), label))
    return picked, images


def write_imagefolder(
    out: str, *, num_classes: int = 6, per_class: int = 4, seed: int = 0, image_size: int = 32
) -> list[str]:
    """``out/<class name>/<i>.png``; returns the class names (sorted = label order)."""
    names, images = _labelled(num_classes, per_class, seed, image_size)
    for i, (png, label) in enumerate(images):
        os.makedirs(os.path.join(out, names[label]), exist_ok=True)
        with open(os.path.join(out, names[label], f"{i:05d}.png"), "wb") as f:
            f.write(png)
    return sorted(names)


def write_wds(
    out: str, *, num_classes: int = 6, per_class: int = 4, seed: int = 0, image_size: int = 32, shard_size: int = 16
) -> list[str]:
    """A clip_benchmark ``wds`` classification set (split ``test``); returns the class names."""
    names, images = _labelled(num_classes, per_class, seed, image_size)
    split = os.path.join(out, "test")
    os.makedirs(split, exist_ok=True)
    shards = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    for s, chunk in enumerate(shards):
        with tarfile.open(os.path.join(split, f"{s}.tar"), "w") as tar:
            for k, (png, label) in enumerate(chunk):
                key = f"s{s:04d}{k:05d}"
                for ext, data in (("png", png), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(split, "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    with open(os.path.join(out, "classnames.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(out, TEMPLATES_FILE), "w") as f:
        f.write("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return names


def _captions(color: str, shape: str, size: str, cell: int) -> list[str]:
    where = CELLS[cell]
    thing = f"{size} {color} {shape}"
    return [
        f"a {thing} {where}",
        f"a photo of a {thing} {where}",
        f"there is a {thing} {where}",
        f"{where}, a {thing}",
        f"a {color} {shape} {where}, {size}",
    ]


def write_retrieval(out: str, *, num_images: int = 24, seed: int = 0, image_size: int = 32) -> str:
    """``out/images/<i>.png`` and ``out/annotations.json`` (``[{"image", "caption": [5]}]``);
    returns the annotation file's path."""
    rng = np.random.default_rng([seed, 3])
    combos = [(c, s, z, cell) for c in COLORS for s in SHAPES for z in SIZES for cell in range(len(CELLS))]
    if not 1 <= num_images <= len(combos):
        raise ValueError(f"num_images must be in [1, {len(combos)}], got {num_images}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    entries = []
    for i in rng.permutation(len(combos))[:num_images]:
        color, shape, size, cell = combos[int(i)]
        rel = f"images/{len(entries):05d}.png"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(render(_scene(color, shape, size, cell, rng), image_size, rng))
        entries.append({"image": rel, "caption": _captions(color, shape, size, cell)})
    path = os.path.join(out, "annotations.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    return path


def write_eval_sets(out: str, *, seed: int = 0, image_size: int = 32) -> dict[str, str]:
    """All three under ``out``; returns their paths (``imagefolder``, ``wds``,
    ``retrieval_images``, ``retrieval_annotations``)."""
    write_imagefolder(os.path.join(out, "imagefolder"), seed=seed, image_size=image_size)
    write_wds(os.path.join(out, "wds"), seed=seed + 1, image_size=image_size)
    ann = write_retrieval(os.path.join(out, "retrieval"), seed=seed, image_size=image_size)
    return {
        "imagefolder": os.path.join(out, "imagefolder"),
        "wds": os.path.join(out, "wds"),
        "retrieval_images": os.path.join(out, "retrieval"),
        "retrieval_annotations": ann,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.data.evalsets",
        description="Write small synthetic evaluation sets: an ImageFolder, a clip_benchmark wds set and a "
        "5-captions-per-image retrieval set.",
    )
    p.add_argument("--output", required=True, help="folder to write imagefolder/, wds/ and retrieval/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    for k, v in write_eval_sets(args.output, seed=args.seed, image_size=args.image_size).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
