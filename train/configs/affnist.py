"""affNIST-style generalisation (paper, section 5.2).

Train on MNIST centred on a 40x40 canvas and randomly translated by up to
6 pixels each way (so the digit can sit anywhere its 28x28 box fits), select
on translated validation digits, test on the affine test set
(train/robustness.py, affine_test_set: rotation +-20 deg, shear +-0.2,
scales 0.8-1.2, translated anywhere the digit fits in 40x40). The paper:
CapsNet 79%, CNN baseline 66% on affNIST, after reaching 99.2% / 99.2% on
the translated MNIST test set.

    python -m train.main --workdir=/tmp/aff --config=train/configs/affnist.py
    python -m train.main --workdir=/tmp/aff_cnn \
        --config=train/configs/affnist.py:baseline_cnn
"""

import ml_collections

from train import configs
from train.configs import default


def get_config(model: str = 'capsnet') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'affnist'
  config.max_shift = 6  # (40 - 28) / 2: anywhere the 28x28 box fits
  config.affnist = ml_collections.ConfigDict()
  config.affnist.canvas_size = 40
  config.affnist.max_rotation_degrees = 20.0
  config.affnist.max_shear = 0.2
  config.affnist.min_scale = 0.8
  config.affnist.max_scale = 1.2
  config.affnist.eval_seed = 0  # same validation shifts and test set always
  return configs.set_model(config, model)
