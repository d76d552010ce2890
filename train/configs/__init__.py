"""Training configs: `default` (CapsNet on MNIST) and the experiments'."""

import ml_collections

MODELS = ('capsnet', 'baseline_cnn', 'lenet5')


def set_model(config: ml_collections.ConfigDict, model: str
              ) -> ml_collections.ConfigDict:
  """Switches `config` (built for CapsNet) to `model`, one of `MODELS`."""
  # Imported here: both modules import `default`, which this package's
  # importers may still be loading.
  from train.configs import baseline_cnn  # pylint: disable=g-import-not-at-top
  from train.configs import lenet5  # pylint: disable=g-import-not-at-top
  if model == 'baseline_cnn':
    return baseline_cnn.set_model(config)
  if model == 'lenet5':
    return lenet5.set_model(config)
  if model != 'capsnet':
    raise ValueError(f'unknown model {model!r}: expected one of {MODELS}')
  return config
