"""Trains and evaluates CapsNet.

    python -m train.main --workdir=/tmp/caps [--config=train/configs/default.py]
        [--config.batch_size=32 ...]
"""

import contextlib
import logging as pylogging
import sys
from pathlib import Path

from train import host_memory


def reuse_requested(argv: list[str]) -> bool:
  """False where argv turns --reuse_host_memory off (as absl reads a bool:
  --noreuse_host_memory, or =false, =f or =0 in any case)."""
  for arg in argv[1:]:
    name, _, value = arg.partition('=')
    if name == '--noreuse_host_memory' or (
        name == '--reuse_host_memory' and value.lower() in ('false', 'f', '0')):
      return False
  return True


# Before the heavy imports below: glibc reads its tunables only at start-up
# (train/host_memory.py, SEPARATE_BLOCK_BYTES).
if __name__ == '__main__' and reuse_requested(sys.argv):
  host_memory.restart_with_huge_pages(sys.orig_argv[1:])

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import checkpoints
from train import config_checks
from train import reporting
from train import train

FLAGS = flags.FLAGS
# The installed package's configs, so that the program runs from any folder.
DEFAULT_CONFIG = Path(__file__).resolve().with_name('configs') / 'default.py'


def fail(message: str, status: int = 2) -> None:
  """A wrong flag or setting (status 2) or a run that cannot go on (1): a
  one-line message, not a traceback."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


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
      str(DEFAULT_CONFIG),
      'Training configuration file.',
      lock_config=True,
  )
flags.DEFINE_bool(
    'reuse_host_memory', True,
    'Keep freed host memory for the next step instead of unmapping it '
    '(train/host_memory.py: a 1.3x faster CapsNet step on CPU); where the '
    'kernel has transparent huge pages, the program starts itself again '
    'with glibc.malloc.hugetlb=1 in GLIBC_TUNABLES, so that blocks of 1 GiB '
    'or more are mapped apart from the heap.')
flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume the run in --workdir even though this config changes its model, '
    'data or optimisation (by default such a rerun is refused).')
flags.mark_flags_as_required(['workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake a one-line `error: ...`."""
  config_file = next((arg.split('=', 1)[1] for arg in argv[1:]
                      if arg.startswith('--config=')), None)
  if config_file and not Path(config_file.split(':', 1)[0]).is_file():
    fail(f'--config={config_file}: no such file')
  with unknown_config_fields_fail():
    try:
      return FLAGS(argv)
    except flags.Error as error:
      fail(str(error))
    except (SyntaxError, OSError, ImportError, NameError) as error:
      # The --config file does not load (ml_collections loads it here when
      # --config.FIELD overrides follow).
      fail(config_file_error(config_file or '', error))


def quiet_libraries() -> None:
  """Only errors from libraries (orbax logs every save, tfds draws progress
  bars) unless --verbosity (or -v) was given: the program prints its own
  progress."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)
    pylogging.getLogger().setLevel(pylogging.ERROR)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def config_file_error(filename: str, error: BaseException) -> str:
  """The one-line message of a config file that does not load."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, SyntaxError):
    return (f'--config={filename}: line {error.lineno}: syntax error '
            f'({error.msg})')
  return (f'--config={filename}: cannot be loaded '
          f'({type(error).__name__}: {" ".join(str(error).split())})')


def loaded_config():
  """FLAGS.config, or `fail` naming the config file and its problem."""
  filename = FLAGS['config'].config_filename
  if not Path(filename.split(':', 1)[0]).is_file():
    fail(f'--config={filename}: no such file')
  try:
    config = FLAGS.config
    config.get('dataset')  # ml_collections loads the file lazily.
    return config
  except Exception as error:  # pylint: disable=broad-except
    fail(config_file_error(filename, error))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  quiet_libraries()
  config = loaded_config()
  if FLAGS.reuse_host_memory:
    host_memory.reuse_freed_host_memory()
  try:
    train.train_and_evaluate(config, FLAGS.workdir,
                             allow_config_change=FLAGS.allow_config_change)
  except config_checks.ConfigError as error:
    fail(str(error))
  except (reporting.TrainingDiverged, checkpoints.CheckpointError) as error:
    fail(str(error), status=1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
