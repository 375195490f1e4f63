"""Write training data in the shard layout the trainer reads.

    python -m dissect_ds.prepare csv --input pairs.csv --output DIR
    python -m dissect_ds.prepare synthetic --num-samples N --noise-rate P --seed S --output DIR

Output: DIR/train/*.tar and DIR/val/*.tar, each with sizes.json and info.json, and
DIR/classnames.txt where class names are known. Set data.train=DIR/train and
data.val=DIR/val. Rewriting a directory replaces the shards written before.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shutil
import sys
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from dissect_ds.data.shards import IMAGE_EXTS
from dissect_ds.data.synthetic import write_synthetic
from dissect_ds.data.writer import ShardWriter, clear_split

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


class PrepareError(Exception):
    """A problem with the input; main() prints it as one line and exits with 2."""


@dataclass
class _Row:
    image: str
    caption: str
    noisy: bool | None
    label: str | None


def _delimiter(path: str, header: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".tab") or ("\t" in header and "," not in header):
        return "\t"
    if ext == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_pairs(path: str, image_key: str = "image", caption_key: str = "caption") -> list[_Row]:
    """Rows of a CSV/TSV with columns image, caption and optional noisy, label; image
    paths may be relative to the table's folder. Raises PrepareError."""
    if not os.path.isfile(path):
        raise PrepareError(f"no such file {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter=_delimiter(path, header))
        fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        missing = [k for k in (image_key, caption_key) if k.lower() not in fields]
        if missing:
            raise PrepareError(f"{path}: missing column(s) {', '.join(missing)}; found {sorted(fields)}")
        rows = []
        for line, rec in enumerate(reader, start=2):

            def get(key: str, rec: dict = rec) -> str:
                name = fields.get(key)
                return (rec.get(name) or "").strip() if name is not None else ""

            noisy_text = get("noisy").lower()
            if noisy_text and noisy_text not in _TRUE | _FALSE:
                raise PrepareError(f"{path}:{line}: noisy must be true/false, got {noisy_text!r}")
            image = get(image_key.lower())
            rows.append(
                _Row(
                    image=image if os.path.isabs(image) else os.path.join(folder, image),
                    caption=get(caption_key.lower()),
                    noisy=(noisy_text in _TRUE) if noisy_text else None,
                    label=get("label") or None,
                )
            )
    if not rows:
        raise PrepareError(f"{path}: no rows")
    return rows


def _labels(rows: list[_Row], classnames: list[str] | None) -> tuple[list[int | None], list[str] | None]:
    """Integer labels per row and the class names (from the file, or the sorted names
    when the label column holds names rather than integers)."""
    given = [r.label for r in rows if r.label is not None]
    if not given:
        return [None] * len(rows), classnames
    if all(_is_int(v) for v in given):
        labels = [None if r.label is None else int(r.label) for r in rows]
        if classnames is not None:
            bad = [v for v in labels if v is not None and not 0 <= v < len(classnames)]
            if bad:
                raise PrepareError(f"label {bad[0]} is outside the {len(classnames)} class names")
        return labels, classnames
    names = classnames if classnames is not None else sorted(set(given))
    index = {n: i for i, n in enumerate(names)}
    unknown = [v for v in given if v not in index]
    if unknown:
        raise PrepareError(f"label {unknown[0]!r} is not in the class names file")
    return [None if r.label is None else index[r.label] for r in rows], names


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _image_bytes(path: str) -> tuple[bytes, str]:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with open(path, "rb") as f:
        data = f.read()
    if ext in IMAGE_EXTS:
        return data, ext
    # Formats the reader does not look for (bmp, gif, tif...) are stored as PNG.
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def prepare_csv(
    input_path: str,
    output: str,
    *,
    val_fraction: float = 0.05,
    shard_size: int = 1000,
    seed: int = 0,
    classnames: str | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    progress: bool = True,
) -> dict[str, int]:
    """Shard a table of pairs into output/train (+ output/val). The val rows are a
    seeded random `val_fraction`; uids are 0.. per split in table order. Returns the
    number of pairs per split. Raises PrepareError before writing anything if an
    image is missing or a column is malformed."""
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rows = read_pairs(input_path, image_key, caption_key)
    missing = [r.image for r in rows if not os.path.isfile(r.image)]
    if missing:
        raise PrepareError(f"{len(missing)} of {len(rows)} images missing, first: {missing[0]}")
    names = None
    if classnames is not None:
        with open(classnames) as f:
            names = [line.strip() for line in f if line.strip()]
    labels, names = _labels(rows, names)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(val_fraction * len(rows))
    if val_fraction > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    splits = {"train": sorted(order[n_val:])}
    if n_val:
        splits["val"] = sorted(order[:n_val])
    os.makedirs(output, exist_ok=True)
    for split, indices in splits.items():
        out_dir = os.path.join(output, split)
        clear_split(out_dir)
        with ShardWriter(out_dir, shard_size, extra_info={"source": os.path.abspath(input_path)}) as w:
            for uid, i in enumerate(tqdm(indices, desc=split, unit="pair", disable=not progress)):
                image, ext = _image_bytes(rows[i].image)
                meta: dict = {}
                if rows[i].noisy is not None:
                    meta["noisy"] = rows[i].noisy
                if labels[i] is not None:
                    meta["label"] = labels[i]
                w.write(uid=uid, image=image, image_ext=ext, caption=rows[i].caption, meta=meta)
    target = os.path.join(output, "classnames.txt")
    if classnames is not None:
        shutil.copyfile(classnames, target)
    elif names is not None:
        with open(target, "w") as f:
            f.write("\n".join(names) + "\n")
    elif any(v is not None for v in labels):
        print(
            f"prepare: integer labels but no --classnames: zero-shot evaluation needs {target}",
            file=sys.stderr,
        )
    return {split: len(indices) for split, indices in splits.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.prepare",
        description="Write image-text pairs as webdataset shards with manifests "
        "(DIR/train, DIR/val, DIR/classnames.txt) for data.train / data.val.",
        epilog="examples:\n"
        "  python -m dissect_ds.prepare synthetic --num-samples 20000 --noise-rate 0.3 "
        "--seed 0 --output data/synth\n"
        "  python -m dissect_ds.prepare csv --input pairs.tsv --output data/mine "
        "--val-fraction 0.05\n"
        "run 'python -m dissect_ds.prepare COMMAND --help' for the options of each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{csv,synthetic}")
    c = sub.add_parser(
        "csv",
        help="shard a CSV/TSV of (image path, caption[, noisy, label])",
        description="Shard a CSV/TSV table with columns image (a path, absolute or "
        "relative to the table's folder), caption, and optional noisy (true/false) and "
        "label (an integer class index or a class name). The delimiter follows the "
        "extension (.tsv: tab) or the header. Exits with 2 if any image is missing.",
    )
    c.add_argument("--input", required=True, help="the CSV/TSV file")
    c.add_argument("--output", required=True, help="output directory DIR")
    c.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of rows held out as DIR/val, 0 for none (default: %(default)s)",
    )
    c.add_argument("--shard-size", type=int, default=1000, help="pairs per tar (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    c.add_argument("--classnames", help="class names file (one per line) to copy to DIR/classnames.txt")
    c.add_argument("--image-key", default="image", help="name of the image column (default: %(default)s)")
    c.add_argument("--caption-key", default="caption", help="name of the caption column (default: %(default)s)")
    s = sub.add_parser(
        "synthetic",
        help="write the procedural shapes set with noisy captions",
        description="Write a procedural captioned-image set: one coloured shape per image "
        "(8 colours x 6 shapes = 48 classes, DIR/classnames.txt) in 3 sizes at 9 positions on a "
        "dark/grey/light background, sometimes with unnamed grey clutter; clean pairs of graded "
        "difficulty (small, low-contrast, cluttered, rare colour-shape pairs); a --noise-rate share "
        "of train pairs gets another image's caption (JSON noisy=true). Val is clean, balanced over "
        "the classes, and each val caption is true of its own image only.",
    )
    s.add_argument("--num-samples", type=int, required=True, help="train pairs (uids 0..N-1)")
    s.add_argument("--noise-rate", type=float, required=True, help="share of train pairs with a wrong caption")
    s.add_argument("--seed", type=int, required=True, help="seed; same arguments, same files")
    s.add_argument("--output", required=True, help="output directory DIR")
    s.add_argument("--val-samples", type=int, default=1000, help="clean val pairs, uids 0..V-1 (default: %(default)s)")
    s.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    s.add_argument("--shard-size", type=int, default=1000, help="pairs per tar (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "csv":
            counts = prepare_csv(
                args.input,
                args.output,
                val_fraction=args.val_fraction,
                shard_size=args.shard_size,
                seed=args.seed,
                classnames=args.classnames,
                image_key=args.image_key,
                caption_key=args.caption_key,
            )
        else:
            counts = write_synthetic(
                args.output,
                num_samples=args.num_samples,
                noise_rate=args.noise_rate,
                seed=args.seed,
                val_samples=args.val_samples,
                image_size=args.image_size,
                shard_size=args.shard_size,
            )
    except (PrepareError, ValueError, OSError) as exn:
        print(f"prepare {args.command}: {exn}", file=sys.stderr)
        return 2
    print(f"prepare {args.command}: wrote {counts} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
