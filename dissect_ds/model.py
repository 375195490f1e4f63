"""open_clip model factory: zoo names plus the small configs in ``model_configs/``.

The model is a plain open_clip ``CLIP`` nn.Module; DeepSpeed wraps it from outside
(engine.py). Weights are never downloaded: ``pretrained`` must be a local file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torchvision.transforms as T

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


@dataclass
class Features:
    """Output of an encoder call on this rank's local batch (no gradient).

    ``image`` and ``text`` are ``[b, D]`` L2-normalised float32 embeddings; ``logit_scale``
    is the exp'd temperature as the loss uses it (clamped at 100).
    """

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: float

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        """The rows of ``parts`` in order (one model's features: one logit scale)."""
        return Features(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]), parts[0].logit_scale)


@dataclass
class ImageNormalize:
    """The end of open_clip's image transform, run where the batch lands (the accelerator):
    uint8 ``[N, C, H, W]`` images in 0-255 become the float input the model expects, as
    ``ToTensor`` + ``Normalize`` would have made them on the CPU; float images pass
    unchanged. Data workers then decode, crop and ship 1 byte per value instead of 4."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if images.device not in self._on:  # once per device: no host-to-device copy per batch
            shape = (1, -1, 1, 1)
            self._on[images.device] = (
                torch.tensor(self.mean).view(shape).to(images.device),
                torch.tensor(self.std).view(shape).to(images.device),
            )
        mean, std = self._on[images.device]
        return (images.float().div_(255) - mean).div_(std)


def split_normalize(transform: Callable) -> tuple[Callable, ImageNormalize | None]:
    """``transform`` (open_clip's: ... ``ToTensor``, ``Normalize``) made to end in a uint8
    tensor, and the normalisation it leaves out; ``(transform, None)`` for any other shape."""
    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return transform, None
    norm = steps[-1]
    return T.Compose([*steps[:-2], T.PILToTensor()]), ImageNormalize(tuple(norm.mean), tuple(norm.std))


def bpe_subset(text: str) -> list[str]:
    """The merges of open_clip's BPE that tokenizing ``text`` uses, in their rank order.

    A ``SimpleTokenizer`` with only these merges (``tokenizer_kwargs.bpe_path`` of a model
    config) cuts ``text``'s words into the same tokens as open_clip's default one, from a
    vocabulary of 512 byte tokens + these merges + 2 special tokens instead of 49,408: a
    small model trained on a closed vocabulary (the synthetic set's) then carries no
    embedding rows it never uses. A word outside ``text`` still tokenizes, into smaller
    pieces. ``model_configs/synthetic_bpe.txt.gz`` holds
    ``bpe_subset(dissect_ds.data.synthetic.caption_text())`` after a ``#version`` line."""
    tok = open_clip.SimpleTokenizer()
    used: set[tuple[str, str]] = set()
    for word in tok.pat.findall(tok.clean_fn(text)):
        chars = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        parts = [*chars[:-1], chars[-1] + "</w>"]
        while True:  # open_clip's bpe(): merge the best-ranked adjacent pair until none is left
            pairs = [p for p in zip(parts, parts[1:]) if p in tok.bpe_ranks]
            if not pairs:
                break
            best = min(pairs, key=tok.bpe_ranks.__getitem__)
            used.add(best)
            merged: list[str] = []
            for part in parts:
                if merged and (merged[-1], part) == best:
                    merged[-1] += part
                else:
                    merged.append(part)
            parts = merged
    return [" ".join(m) for m in sorted(used, key=tok.bpe_ranks.__getitem__)]


def tokenizer_kwargs(model_cfg: dict) -> dict:
    """``model_cfg``'s tokenizer arguments with a relative ``bpe_path`` made a path into
    ``model_configs/`` (open_clip would read it from the working directory)."""
    kwargs = dict(model_cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {})
    if "bpe_path" in kwargs:
        kwargs["bpe_path"] = str(CONFIG_DIR / kwargs["bpe_path"])  # an absolute path stays as it is
    return kwargs


def get_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for model ``name`` (a config name or ``local-dir:DIR``)."""
    return open_clip.get_tokenizer(name, **tokenizer_kwargs(open_clip.get_model_config(name) or {}))


def model_exists(name: str) -> bool:
    return name in open_clip.list_models()


def build_model(
    name: str,
    pretrained: str | None = None,
    *,
    grad_checkpointing: bool = False,
    patch_dropout: float = 0.0,
    augment: bool = True,
) -> tuple[torch.nn.Module, Callable, Callable, Callable[[list[str]], torch.Tensor]]:
    """Return (model, train transform, val transform, tokenizer), model in fp32 on CPU.

    Precision and device are applied by the engine. ``pretrained`` is a local
    state-dict file (e.g. one written by ``export_open_clip``). ``grad_checkpointing``
    recomputes transformer blocks in the backward pass instead of storing their
    activations (open_clip's switch); ``patch_dropout`` drops that share of a ViT's image
    patches in training mode only (FLIP), so scoring and evaluation, which run in
    inference mode, see every patch. ``augment`` False makes the train transform the val
    transform (resize, centre crop; no random resized crop).
    """
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=pretrained,
        precision="fp32",
        device="cpu",
        output_dict=True,
        force_patch_dropout=patch_dropout or None,
    )
    model.set_grad_checkpointing(grad_checkpointing)
    return model, preprocess_train if augment else preprocess_val, preprocess_val, get_tokenizer(name)


def main() -> None:
    p = argparse.ArgumentParser(description="List the model names dissect_ds accepts (model.name).")
    p.add_argument("--list", action="store_true", help="print every known model name")
    args = p.parse_args()
    names = open_clip.list_models()
    ours = sorted(f.stem for f in CONFIG_DIR.glob("*.json"))
    print("dissect_ds configs: " + ", ".join(ours))
    if args.list:
        print("open_clip zoo: " + ", ".join(n for n in names if n not in ours))


if __name__ == "__main__":
    main()
