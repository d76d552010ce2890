"""LeNet-5 on MNIST (train/baselines.py, LeNet5): 61,706 parameters.

    python -m train.main --workdir=/tmp/lenet --config=train/configs/lenet5.py
"""

import ml_collections

from train.configs import default


def set_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches `config` to LeNet-5 (no decoder)."""
  config.model.name = 'lenet5'
  config.model.lenet = ml_collections.ConfigDict()
  config.model.lenet.activation = 'relu'  # or 'tanh' (1998 style)
  config.model.lenet.pooling = 'max'  # or 'avg' (1998 style)
  config.reconstruction_weight = 0.0
  return config


def get_config() -> ml_collections.ConfigDict:
  return set_model(default.get_config())
