"""Runs `train.train_and_evaluate` in its own process and dumps the result.

Used by tests/test_train.py for runs that need a fresh JAX (a forced number
of CPU devices, set with XLA_FLAGS before JAX starts, or
`jax.distributed.initialize` with several processes):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multidevice_worker.py --workdir=DIR --out=OUT.npz \
        --overrides='{"max_steps": 4, "model.conv_features": 16}'

--delay_data_on_process_0=SECONDS makes process 0 that much slower to
prepare the data than the others.

OUT.npz holds the parameters this process holds at the end of training (its
own copy of the replicated state, not a checkpoint read back), one array per
'/'-joined parameter path, plus `__meta__`: a JSON string with the step, the
process index and count, the device count and the test results.
"""

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from train import tfds_splits  # pylint: disable=g-import-not-at-top
from train import train  # pylint: disable=g-import-not-at-top
from train.configs import default  # pylint: disable=g-import-not-at-top


def make_config(overrides: dict):
  config = default.get_config()
  config.lock()  # An unknown field is an error, as on the command line.
  for dotted, value in overrides.items():
    *parents, name = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = tuple(value) if isinstance(value, list) else value
  return config


def local_copy(array: jax.Array) -> np.ndarray:
  """This process's copy of a replicated array."""
  assert array.sharding.is_fully_replicated, array.sharding
  return np.asarray(array.addressable_data(0))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--overrides', default='{}', help='JSON: field: value')
  parser.add_argument('--delay_data_on_process_0', type=float, default=0,
                      help='seconds process 0 waits before loading the data')
  args = parser.parse_args()
  if 'process_id' in json.loads(args.overrides):
    # One of several processes that waits for the others far longer than a
    # run takes shows where (in its stderr, reported on failure).
    faulthandler.dump_traceback_later(150, repeat=True)

  if args.delay_data_on_process_0:
    load_splits = tfds_splits.load_splits

    def slow_load_splits(*load_args, **load_kwargs):
      if jax.process_index() == 0:  # Known only once jax.distributed is up.
        time.sleep(args.delay_data_on_process_0)
      return load_splits(*load_args, **load_kwargs)

    tfds_splits.load_splits = slow_load_splits

  final = {}
  test_best = train._test_best  # pylint: disable=protected-access

  def capture_final_state(config, checkpoints, state, *rest, **kwargs):
    final['state'] = state  # The state after the last step.
    final['params'] = jax.tree_util.tree_map(local_copy, state.params)
    return test_best(config, checkpoints, state, *rest, **kwargs)

  train._test_best = capture_final_state  # pylint: disable=protected-access
  results = train.train_and_evaluate(make_config(json.loads(args.overrides)),
                                     args.workdir)

  arrays = {
      '/'.join(str(getattr(key, 'key', key)) for key in path): value
      for path, value in jax.tree_util.tree_leaves_with_path(final['params'])
  }
  meta = {
      'step': int(local_copy(final['state'].step)),
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'results': results,
  }
  np.savez(args.out, __meta__=json.dumps(meta), **arrays)


if __name__ == '__main__':
  main()
