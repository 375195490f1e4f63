"""dissect_ds: a DeepSpeed CLIP trainer with online DISSect sample selection."""

__version__ = "0.1.0"
