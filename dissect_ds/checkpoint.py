"""Checkpoints of a run: the one owner of ``<run_dir>/checkpoints/``.

Layout: ``checkpoints/<tag>/`` holds DeepSpeed's files (model, optimizer, scheduler), one
``rank{R}.pt`` per rank with the trainer's components, the resolved ``config.yaml`` and, once
every rank finished writing, ``complete.json``; ``checkpoints/latest`` names the newest
complete tag. A tag is written into a fresh ``<tag>.partial`` folder and renamed into place,
so a crash or a full disk at any point leaves ``latest`` on a complete checkpoint and never
mixes two saves (e.g. of another world size) in one tag.

What is restored at another world size is decided here, per component kind:
``replicated`` state (the train counters) comes from rank 0; ``sharded`` state (the selection
history, the data stream positions) is handed over whole, every saved rank's, for the
component to re-shard; ``per_rank`` state (RNG) is restored only at the same world size. The checks that need no process
group (a resume path that is not a checkpoint, a changed model or batch, ZeRO optimizer state
at another world size) run during config validation, before anything starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from dissect_ds.config import Config, ConfigError, to_dict

REPLICATED, SHARDED, PER_RANK = "replicated", "sharded", "per_rank"
LATEST, COMPLETE, PARTIAL = "latest", "complete.json", ".partial"
# Changing these on resume changes what the optimizer state and history mean.
GUARDED_KEYS = ("model.name", "train.batch_size", "selection.strategy", "selection.rate")


class CheckpointError(RuntimeError):
    """Saving failed (the message is one line); the partial tag has been removed."""


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def _step_of(tag: Path) -> int:
    digits = "".join(c for c in tag.name if c.isdigit())
    return int(digits) if digits else -1


def complete_tags(root: Path) -> list[Path]:
    """Complete tags under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if (p / COMPLETE).is_file() and not p.name.endswith(PARTIAL)), key=_step_of
    )


def _latest(root: Path) -> Path | None:
    """The tag ``latest`` names, or the newest complete tag when that one is gone."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = root / pointer.read_text().strip()
        if (tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint tag to resume from, or None to start fresh. Raises ConfigError (one line)
    for a path that is not a complete checkpoint."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        return _latest(cfg.run_dir / "checkpoints")
    p = Path(cfg.resume)
    if p.name == LATEST or (p / LATEST).is_file():
        root = p.parent if p.name == LATEST else p
        tag = _latest(root)
        if tag is None:
            raise ConfigError(f"resume: {cfg.resume} names no complete checkpoint")
        return tag
    if not p.is_dir():
        raise ConfigError(
            f"resume: {cfg.resume} is not a checkpoint directory (expected 'latest', empty, or "
            "<run>/checkpoints/stepNNNNNNNN)"
        )
    if not (p / COMPLETE).is_file():
        hint = "an incomplete checkpoint (its save never finished)" if any(p.glob("rank*.pt")) else "not a checkpoint"
        raise ConfigError(f"resume: {cfg.resume} is {hint}; pick a tag with {COMPLETE}, or resume=latest")
    return p


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(cfg: Config, world_size: int | None, zero_stage: int) -> None:
    """Resume checks that need no process group; raises ConfigError (one line)."""
    root = cfg.run_dir / "checkpoints"
    if not cfg.resume:
        if _latest(root) is not None:
            raise ConfigError(
                f"run.name: {cfg.run_dir} already holds checkpoints; pass resume=latest to continue it, "
                "or pick another run.name"
            )
        return
    tag = resolve_resume(cfg)
    if tag is None:
        return
    saved_world = json.loads((tag / COMPLETE).read_text()).get("world_size")
    if world_size is not None and saved_world not in (None, world_size) and zero_stage > 0:
        raise ConfigError(
            f"resume: {tag} was written by {saved_world} ranks; DeepSpeed cannot load ZeRO-{zero_stage} optimizer "
            f"state on {world_size} ranks: resume with {saved_world} ranks"
        )
    saved_cfg = tag / "config.yaml"
    if not saved_cfg.is_file():
        return
    before, now = _flat(yaml.safe_load(saved_cfg.read_text()) or {}), _flat(to_dict(cfg))
    changed = [k for k in GUARDED_KEYS if k in before and before[k] != now.get(k)]
    if "model.name" in changed:
        raise ConfigError(
            f"model.name: the checkpoint {tag} holds {before['model.name']!r}, not {cfg.model.name!r}; "
            "start a new run (another run.name) to train another model"
        )
    if changed and not cfg.checkpoint.allow_config_change:
        what = ", ".join(f"{k} {before[k]!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"resume: {what} differs from the checkpoint {tag}; set checkpoint.allow_config_change=true to resume anyway"
        )


class Checkpoints:
    """Saves named components (objects with ``state_dict()``) plus the DeepSpeed engine under
    ``run_dir`` and restores them by kind: REPLICATED, SHARDED or PER_RANK (module docstring).
    Every method is collective."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.root = cfg.run_dir / "checkpoints"

    def save(self, step: int, engine, components: dict[str, object]) -> Path:
        from dissect_ds import distributed as D

        tag = self.root / tag_name(step)
        partial = tag.with_name(tag.name + PARTIAL)
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a crash: never mix two saves
        D.barrier()
        error = ""
        try:
            state = {name: obj.state_dict() for name, obj in components.items()}
            engine.save_checkpoint(self.root, partial.name)
            path = partial / f"rank{self.rank:05d}.pt"
            _atomic_torch_save(state, path)
            if self.rank == 0:
                (partial / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        except OSError as e:
            error = f"{e.strerror or e} ({e.filename or partial})"
        except RuntimeError as e:  # torch.save reports a failed write (e.g. a full disk) this way
            if "write" not in str(e):
                raise
            error = f"{str(e).splitlines()[0]} ({partial})"
        if not D.all_ok(not error):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"checkpoint {tag.name} not written: {error or 'another rank failed to write'}")
        if self.rank == 0:
            (partial / COMPLETE).write_text(json.dumps({"world_size": self.world_size, "step": step}))
            stale = tag.with_name(tag.name + ".stale")
            if tag.exists():
                os.replace(tag, stale)
            os.replace(partial, tag)
            shutil.rmtree(stale, ignore_errors=True)
            tmp = self.root / (LATEST + ".tmp")
            tmp.write_text(tag.name)
            os.replace(tmp, self.root / LATEST)
            for old in complete_tags(self.root)[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return tag

    def restore(self, tag: Path, engine, kinds: dict[str, str]) -> dict[str, object]:
        """Load DeepSpeed's state into ``engine`` and return each component's state to apply:
        REPLICATED -> rank 0's dict, SHARDED -> every saved rank's dicts, PER_RANK -> this
        rank's dict at the same world size, else None (that state starts fresh)."""
        import torch

        engine.load_checkpoint(tag.parent, tag.name)
        states = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(tag.glob("rank*.pt"))]
        same_world = len(states) == self.world_size
        out: dict[str, object] = {}
        for name, kind in kinds.items():
            if kind == REPLICATED:
                out[name] = states[0][name]
            elif kind == SHARDED:
                out[name] = [s[name] for s in states]
            else:
                out[name] = states[self.rank][name] if same_world else None
        return out


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
