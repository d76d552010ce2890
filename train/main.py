"""Trains and evaluates CapsNet.

    python -m train.main --workdir=/tmp/caps [--config=train/configs/default.py]
        [--config.batch_size=32 ...]
"""

import contextlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import host_memory
from train import train

FLAGS = flags.FLAGS


def fail(message: str) -> None:
  """A wrong flag or setting: a one-line message, not a traceback."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def unknown_config_field(argv: list[str], error: Exception) -> str | None:
  """'--config.batch_sze: no such config field. Did you mean ...', or None
  if `error` is not about one of the --config.<field> flags in argv."""
  while error.args and isinstance(error.args[0], (AttributeError, KeyError)):
    error = error.args[0]  # ml_collections: AttributeError(KeyError(text)).
  text = str(error.args[0]) if error.args else ''
  # "'batch_sze'", then for a near miss '\nDid you mean "batch_size" ...?'.
  field, _, hint = text.partition('\n')
  field = field.strip('\'"')
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    if (name.lstrip('-').startswith('config.')
        and field in name.split('.')[1:]):
      return ' '.join(filter(None, [f'{name}: no such config field.', hint]))
  return None


@contextlib.contextmanager
def unknown_config_fields_fail():
  """Turns ml_collections' error for --config.<unknown field> into `fail`.

  ml_collections reads the --config.<field> overrides from sys.argv when it
  parses the config: at DEFINE_config_file for the default config file, at
  flag parsing for one given with --config=.
  """
  try:
    yield
  except (AttributeError, KeyError) as error:
    message = unknown_config_field(sys.argv, error)
    if message is None:
      raise
    fail(message)


flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
with unknown_config_fields_fail():
  config_flags.DEFINE_config_file(
      'config',
      'train/configs/default.py',
      'Training configuration file.',
      lock_config=True,
  )
flags.DEFINE_bool(
    'reuse_host_memory', True,
    'Keep freed host memory for the next step instead of unmapping it '
    '(train/host_memory.py: a 1.3x faster CapsNet step on CPU).')
flags.mark_flags_as_required(['workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake a one-line `error: ...`."""
  with unknown_config_fields_fail():
    try:
      return FLAGS(argv)
    except flags.Error as error:
      fail(str(error))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.reuse_host_memory:
    host_memory.reuse_freed_host_memory()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.ConfigError as error:
    logging.error('%s', error)
    fail(str(error))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
