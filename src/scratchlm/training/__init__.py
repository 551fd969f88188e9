"""Training: ``TrainConfig`` (the settings), ``train`` (set-up → ``build_data`` → ``fit`` → export)."""

from .config import TrainConfig
from .loop import NonFiniteLoss, fit
from .trainer import train

__all__ = ["NonFiniteLoss", "TrainConfig", "fit", "train"]
