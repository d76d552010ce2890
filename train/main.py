"""Trains and evaluates CapsNet.

    python -m train.main --workdir=/tmp/caps [--config=train/configs/default.py]
        [--config.batch_size=32 ...]
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config',
    'train/configs/default.py',
    'Training configuration file.',
    lock_config=True,
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.ConfigError as error:
    # A wrong setting is a one-line message, not a traceback.
    logging.error('%s', error)
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
