"""Sample selection: which pairs of each global batch are trained on (DISSect and baselines).

The trainer builds one :class:`Selector` from the ``selection`` config section and calls
``select`` before each micro-batch and ``after_step`` after each optimizer step (all
schedules count optimizer steps); strategies live in the
:data:`STRATEGIES` registry, so the train loop never branches on a strategy name.
"""

from dissect_ds.selection.config import SelectionConfig
from dissect_ds.selection.historical import HistoricalModel, LiveSnapshot
from dissect_ds.selection.memory import ScoreMemory
from dissect_ds.selection.scored import ScoredBatch
from dissect_ds.selection.selector import Selection, Selector
from dissect_ds.selection.strategies import STRATEGIES, Strategy, validate

__all__ = [
    "STRATEGIES",
    "HistoricalModel",
    "LiveSnapshot",
    "ScoreMemory",
    "ScoredBatch",
    "Selection",
    "SelectionConfig",
    "Selector",
    "Strategy",
    "validate",
]
