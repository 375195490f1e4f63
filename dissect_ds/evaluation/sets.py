"""Evaluation sets named in the ``eval`` config section, resolved and checked up front.

Zero-shot classification (``eval.zeroshot.<name>``): a path, or a mapping with ``path``
and optional ``classnames`` (file, one name a line), ``templates`` (file, one prompt a
line with ``{c}`` or ``{}`` for the class name) and ``split`` (clip_benchmark layout
only, default ``test``). The path is one of

- an ImageFolder tree (one folder per class, e.g. ImageNet val): class names are the
  folder names, or ImageNet-1k's when there are 1000 classes;
- a clip_benchmark ``wds`` set: ``<path>/<split>/nshards.txt`` and ``0.tar``...
  (samples with an image and ``cls``), ``classnames.txt`` and
  ``zeroshot_classification_templates.txt`` in ``<path>``;
- dissect_ds shards (a prepared split, labels in each sample's JSON, ``classnames.txt``
  in or beside the folder).

Templates default to open_clip's 80 OpenAI ImageNet prompts, as in clip_benchmark.

Retrieval (``eval.retrieval.<name>``): ``{images: DIR, annotations: FILE}``, FILE in the
Karpathy layout (``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}``,
``split`` picks the entries, default ``test``) or the clip_benchmark/BLIP layout
(``[{"image": "rel/path.jpg", "caption": ["...", ...]}]``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

WDS_CLASSNAMES = "classnames.txt"
WDS_TEMPLATES = "zeroshot_classification_templates.txt"

Template = str | Callable[[str], str]


class SetError(ValueError):
    """An unusable evaluation set; the message is one line naming the config key."""


@dataclass(frozen=True)
class ZeroShotSet:
    """A labelled image set: ``kind`` is ``imagefolder``, ``wds`` or ``shards``;
    ``samples`` lists ``(image path, label)`` for ``imagefolder``, ``shards`` the tar
    files for ``wds`` and the shard spec's folder for ``shards``."""

    name: str
    kind: str
    path: str
    classnames: tuple[str, ...]
    templates: tuple[Template, ...]
    samples: tuple[tuple[str, int], ...] = ()
    shards: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetrievalSet:
    """``images[i]`` is described by every caption ``j`` with ``caption_image[j] == i``."""

    name: str
    images: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: tuple[int, ...]


def fill_template(template: str, classname: str) -> str:
    """``template`` with the class name for ``{c}`` (clip_benchmark) or ``{}`` (open_clip)."""
    return template.format(classname, c=classname)


def _read_lines(path: str, key: str) -> list[str]:
    if not os.path.isfile(path):
        raise SetError(f"{key}: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise SetError(f"{key}: {path!r} is empty")
    return lines


def _templates(path: str, key: str) -> tuple[Template, ...]:
    lines = _read_lines(path, key)
    bad = [t for t in lines if "{c}" not in t and "{}" not in t]
    if bad:
        raise SetError(f"{key}: template {bad[0]!r} in {path!r} has no '{{c}}' for the class name")
    # open_clip's classifier formats plain strings positionally; clip_benchmark's files use {c}.
    return tuple(partial(fill_template, t) for t in lines)


def _imagefolder(path: Path, key: str) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(path), allow_empty=True)
    except FileNotFoundError:
        raise SetError(f"{key}: {str(path)!r} has no class folders (expected an ImageFolder tree)") from None
    counts = Counter(folder.targets)
    empty = [c for i, c in enumerate(folder.classes) if not counts[i]]
    if empty:
        raise SetError(f"{key}: class folder {str(path / empty[0])!r} holds no images")
    return folder.classes, folder.samples


def zeroshot_set(name: str, spec: str | dict) -> ZeroShotSet:
    """Resolve ``eval.zeroshot.<name>``; raises SetError."""
    key = f"eval.zeroshot.{name}"
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise SetError(f"{key}: expected a path or a mapping with 'path' (and classnames, templates, split)")
    unknown = set(spec) - {"path", "classnames", "templates", "split"}
    if unknown:
        raise SetError(f"{key}: unknown key {sorted(unknown)[0]!r} (allowed: path, classnames, templates, split)")
    path = Path(spec["path"])
    if not path.is_dir():
        raise SetError(f"{key}: no such folder {str(path)!r}")
    split = str(spec.get("split", "test"))
    samples: list[tuple[str, int]] = []
    shards: list[str] = []
    default_templates: Sequence[Template] = OPENAI_IMAGENET_TEMPLATES
    nshards = path / split / "nshards.txt"
    if nshards.is_file():
        kind = "wds"
        try:
            n = int(nshards.read_text().strip())
        except ValueError:
            raise SetError(f"{key}: {str(nshards)!r} must hold the number of shards") from None
        shards = [str(path / split / f"{i}.tar") for i in range(n)]
        missing = [s for s in shards if not os.path.isfile(s)]
        if n < 1 or missing:
            raise SetError(f"{key}: {str(nshards)!r} names {n} shards but {missing[:1] or 'none'} is missing")
        names = _read_lines(str(path / WDS_CLASSNAMES), key) if (path / WDS_CLASSNAMES).is_file() else None
        if (path / WDS_TEMPLATES).is_file():
            default_templates = _templates(str(path / WDS_TEMPLATES), key)
        if names is None and not spec.get("classnames"):
            raise SetError(f"{key}: no {WDS_CLASSNAMES} in {str(path)!r}; give 'classnames'")
    elif any(path.glob("*.tar")):
        from dissect_ds.data import DataConfig, read_classnames, read_templates, validate_spec

        kind = "shards"
        err = validate_spec(str(path), name=key)
        if err:
            raise SetError(err)
        names = read_classnames(DataConfig(val=str(path)))
        beside = read_templates(DataConfig(val=str(path)))
        if beside:
            default_templates = tuple(partial(fill_template, t) for t in beside)
        if names is None and not spec.get("classnames"):
            raise SetError(f"{key}: no classnames.txt in or beside {str(path)!r}; give 'classnames'")
    else:
        kind = "imagefolder"
        names, samples = _imagefolder(path, key)
        if len(names) == len(IMAGENET_CLASSNAMES):
            names = list(IMAGENET_CLASSNAMES)
    if spec.get("classnames"):
        custom = _read_lines(str(spec["classnames"]), f"{key}.classnames")
        if kind == "imagefolder" and len(custom) != len(names):
            raise SetError(
                f"{key}.classnames: {spec['classnames']!r} has {len(custom)} names but {str(path)!r} has {len(names)} classes"
            )
        names = custom
    templates = _templates(str(spec["templates"]), f"{key}.templates") if spec.get("templates") else default_templates
    return ZeroShotSet(name, kind, str(path), tuple(names), tuple(templates), tuple(samples), tuple(shards))


def _annotations(path: str, key: str, split: str) -> list[tuple[str, list[str]]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SetError(f"{key}.annotations: cannot read {path!r} as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy's dataset_*.json
        entries = [
            (os.path.join(e.get("filepath", ""), e["filename"]), [s["raw"] for s in e.get("sentences", [])])
            for e in data["images"]
            if e.get("split", split) == split
        ]
    elif isinstance(data, list) and all(isinstance(e, dict) and "image" in e and "caption" in e for e in data):
        entries = [(e["image"], [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])) for e in data]
    else:
        raise SetError(
            f"{key}.annotations: {path!r} is neither Karpathy's {{'images': [...]}} nor a list of {{image, caption}}"
        )
    if not entries:
        raise SetError(f"{key}.annotations: {path!r} has no image of split {split!r}")
    return entries


def retrieval_set(name: str, spec: dict) -> RetrievalSet:
    """Resolve ``eval.retrieval.<name>``; raises SetError (also when an annotated image is missing)."""
    key = f"eval.retrieval.{name}"
    if not isinstance(spec, dict) or not {"images", "annotations"} <= set(spec):
        raise SetError(f"{key}: expected a mapping with 'images' (folder) and 'annotations' (file)")
    unknown = set(spec) - {"images", "annotations", "split"}
    if unknown:
        raise SetError(f"{key}: unknown key {sorted(unknown)[0]!r} (allowed: images, annotations, split)")
    root = str(spec["images"])
    if not os.path.isdir(root):
        raise SetError(f"{key}.images: no such folder {root!r}")
    entries = _annotations(str(spec["annotations"]), key, str(spec.get("split", "test")))
    images, captions, owner = [], [], []
    for rel, caps in entries:
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            raise SetError(f"{key}.annotations: image {rel!r} is not in {root!r}")
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            raise SetError(f"{key}.annotations: image {rel!r} has no caption")
        captions.extend(caps)
        owner.extend([len(images)] * len(caps))
        images.append(full)
    return RetrievalSet(name, tuple(images), tuple(captions), tuple(owner))
