"""Training: typed config, objective, checkpoints and the loop."""

from xmodal.train.config import TrainConfig, load_train_config
from xmodal.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_train_config", "train"]
