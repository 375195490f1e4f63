"""The `eval` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """When and on what to evaluate.

    `every_steps` 0: only at the end. `batch_size` and `num_workers` are per rank.
    `zeroshot`: name -> a labelled image set (a path, or a mapping with path,
    classnames, templates, split); `retrieval`: name -> {images, annotations, split}.
    See dissect_ds/evaluation/sets.py for the layouts. The val shards (``data.val``)
    are evaluated too, under the names ``eval/i2t_R@1``, ``eval/zeroshot_top1``, ...
    """

    every_steps: int = 0
    batch_size: int = 256
    num_workers: int = 2
    zeroshot: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)

    def validate(self) -> str | None:
        """None if usable, else a one-line error naming the key. Reads every set's
        index (folders, class names, annotation files), not its images."""
        from dissect_ds.evaluation.sets import SetError, retrieval_set, zeroshot_set

        if self.every_steps < 0:
            return "eval.every_steps: must be >= 0 (0 = final only)"
        if self.batch_size <= 0:
            return f"eval.batch_size: must be > 0, got {self.batch_size}"
        if self.num_workers < 0:
            return f"eval.num_workers: must be >= 0, got {self.num_workers}"
        for key, sets in (("eval.zeroshot", self.zeroshot), ("eval.retrieval", self.retrieval)):
            if not isinstance(sets, dict):
                return f"{key}: expected a mapping of set names, got {sets!r}"
            bad = [n for n in sets if not isinstance(n, str) or not n or "/" in n]
            if bad:
                return f"{key}: set name {bad[0]!r} must be a non-empty string without '/'"
        clash = set(self.zeroshot) & set(self.retrieval)
        if clash:
            return f"eval: set name {sorted(clash)[0]!r} is used by both eval.zeroshot and eval.retrieval"
        try:
            for name, spec in self.zeroshot.items():
                zeroshot_set(name, spec)
            for name, spec in self.retrieval.items():
                retrieval_set(name, spec)
        except SetError as e:
            return str(e)
        return None
