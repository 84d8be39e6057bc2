"""Training: `train_model` is what `cli.py train` calls."""
from cnnbench.train.loop import TrainConfig, train_model

__all__ = ["TrainConfig", "train_model"]
