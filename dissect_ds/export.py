"""Export weights as a directory that the open_clip ecosystem loads without dissect_ds:
``open_clip.create_model_and_transforms("local-dir:DIR")``, ``open_clip.get_tokenizer``
and clip_benchmark (``--model local-dir:DIR``).

DIR holds ``open_clip_config.json`` (``model_cfg``: the architecture, so configs that
only dissect_ds registers load too; ``preprocess_cfg``: image size, mean, std,
interpolation, resize mode) and ``open_clip_model.safetensors`` (fp32); a config with its
own BPE vocabulary (``tokenizer_kwargs.bpe_path``) also gets a copy of that file, named by
its absolute path, which is how open_clip reads it (moving DIR means editing that path).

``python -m dissect_ds.export --run runs/x [--checkpoint TAG] [--output DIR]`` exports
any DeepSpeed checkpoint of a run (any ZeRO stage) the same way; training writes
``runs/<run>/open_clip/`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def write_open_clip_dir(state: dict[str, torch.Tensor], model: torch.nn.Module, model_name: str, out: Path) -> None:
    """Write ``state`` (the model's full state dict) and the config of ``model_name``
    with ``model``'s preprocessing to ``out``; files appear whole (write, then rename)."""
    from safetensors.torch import save_file

    from dissect_ds.model import tokenizer_kwargs

    model_cfg = open_clip.get_model_config(model_name)  # dissect-* configs: registered by dissect_ds.model
    if model_cfg is None:
        raise ValueError(f"export: open_clip knows no config named {model_name!r}")
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    out.mkdir(parents=True, exist_ok=True)
    bpe = tokenizer_kwargs(model_cfg).get("bpe_path")
    if bpe:  # a config's own vocabulary travels with the weights; open_clip wants its path absolute
        target = out / Path(bpe).name
        _write_whole(target, lambda tmp: shutil.copyfile(bpe, tmp))
        model_cfg["text_cfg"]["tokenizer_kwargs"]["bpe_path"] = str(target.resolve())
    # Copies: safetensors refuses tensors that share storage.
    weights = {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}
    _write_whole(out / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    config = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    _write_whole(out / CONFIG_FILE, lambda tmp: tmp.write_text(config))


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it: ``path`` appears whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def resolve_checkpoint(run_dir: Path, tag: str | None) -> Path:
    """``run_dir/checkpoints/<tag>`` (``latest`` or None: the newest complete one)."""
    root = run_dir / "checkpoints"
    if tag in (None, "latest"):
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"--run: {run_dir} has no checkpoints/latest")
        tag = latest.read_text().strip()
    path = root / tag
    if not (path / "complete.json").is_file():
        have = sorted(p.name for p in root.glob("*") if (p / "complete.json").is_file()) if root.is_dir() else []
        raise FileNotFoundError(
            f"--checkpoint: no complete checkpoint {tag!r} in {root} (have: {', '.join(have) or 'none'})"
        )
    return path


def run_model_name(run_dir: Path) -> str:
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"--run: {cfg} not found (not a run directory)")
    return yaml.safe_load(cfg.read_text())["model"]["name"]


def load_checkpoint_model(run_dir: Path, tag: str | None):
    """``(model, preprocess_val, tokenizer, model_name, checkpoint dir)`` with the
    checkpoint's fp32 weights, in one process."""
    from dissect_ds.engine import checkpoint_state_dict
    from dissect_ds.model import build_model

    name = run_model_name(run_dir)
    path = resolve_checkpoint(run_dir, tag)
    model, _, preprocess, tokenizer = build_model(name)
    model.load_state_dict(checkpoint_state_dict(path), strict=True)
    return model, preprocess, tokenizer, name, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.export",
        description="Export a run's DeepSpeed checkpoint (any ZeRO stage) as a directory that "
        "open_clip.create_model_and_transforms('local-dir:DIR') and clip_benchmark load.",
    )
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="checkpoint tag, e.g. step00000020 (default: latest)")
    p.add_argument("--output", help="export directory (default: RUN/open_clip-TAG)")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    try:
        model, _, _, name, path = load_checkpoint_model(run_dir, args.checkpoint)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"export error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else run_dir / f"open_clip-{path.name}"
    write_open_clip_dir(model.state_dict(), model, name, out)
    print(f"wrote {out} ({name}, {path}); load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
