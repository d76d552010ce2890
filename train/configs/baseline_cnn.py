"""The paper's baseline CNN on MNIST (train/baselines.py, BaselineCNN).

Three 5x5 convolutions (256, 256, 128 channels, SAME, no pooling), FC 328,
FC 192, dropout, 10 logits: 35,445,522 parameters on 28x28. Softmax cross
entropy, same optimiser and augmentation as CapsNet.

    python -m train.main --workdir=/tmp/cnn --config=train/configs/baseline_cnn.py
"""

import ml_collections

from train.configs import default


def set_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches `config` to the baseline CNN (no decoder)."""
  config.model.name = 'baseline_cnn'
  config.model.cnn = ml_collections.ConfigDict()
  config.model.cnn.conv_features = (256, 256, 128)
  config.model.cnn.hidden_sizes = (328, 192)
  config.model.cnn.dropout_rate = 0.5
  # Conv layers (0-based) followed by 2x2 max-pooling; the paper's 35.4M
  # parameters imply none.
  config.model.cnn.pool_after = ()
  config.reconstruction_weight = 0.0
  return config


def get_config() -> ml_collections.ConfigDict:
  return set_model(default.get_config())
