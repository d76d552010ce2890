"""CapsNet on MultiMNIST (paper, section 6; train/multimnist.py).

Pairs of digits of different classes, each shifted by up to 4 pixels on a
36x36 canvas and overlaid, made on the fly from the training digits (one
pair per training digit per epoch). Two-label margin loss, each digit
reconstructed from its own capsule; an example is right when its two
longest capsules are its two labels.

    python -m train.main --workdir=/tmp/multi --config=train/configs/multimnist.py
    # The baselines on MultiMNIST:
    python -m train.main --workdir=/tmp/multi_cnn \
        --config=train/configs/multimnist.py:baseline_cnn
"""

import ml_collections

from train import configs
from train.configs import default


def get_config(model: str = 'capsnet') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'multimnist'
  config.max_shift = 4  # per digit, on the 36x36 canvas
  config.multimnist = ml_collections.ConfigDict()
  # 'max': pixel-wise max; 'sum': sum clipped to 1 (the official code's).
  config.multimnist.merge = 'max'
  # Fixed evaluation pairs (validation: from the 5000 held-out training
  # digits; test: from the test split). test_pairs_per_digit=1000 is the
  # paper's test set (10M pairs, generated batch by batch); 0 uses
  # num_test_pairs. num_eval_examples > 0 caps both.
  config.multimnist.num_validation_pairs = 10000
  config.multimnist.num_test_pairs = 10000
  config.multimnist.test_pairs_per_digit = 0
  config.multimnist.eval_seed = 0  # the same evaluation pairs for every run
  config.num_reconstructions = 8
  return configs.set_model(config, model)
