"""Trained CapsNet parameters shipped with the repository.

    import train.pretrained
    model, params = train.pretrained.load('mnist')
    output = model.apply({'params': params}, images)  # (N, 28, 28, 1) in [0, 1]
    predictions = output.lengths.argmax(-1)

`train/pretrained/<name>.npz` holds the parameters only (no optimizer
state), as plain arrays keyed by their path in the parameter tree
('conv1/kernel', ...): numpy reads them with `allow_pickle=False`, so
loading runs no code from the file. `<name>.json` beside it holds the
config that builds the model, the file's SHA-256 (checked on every load),
and where the parameters came from; `<name>.md` is the model card.

    python -m train.pretrained --workdir=DIR --name=mnist

exports the best checkpoint on validation of a finished training workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from train import models
from train import trained

DIRECTORY = Path(__file__).resolve().with_name('pretrained')


class PretrainedError(ValueError):
  """Missing, damaged or unknown pretrained parameters."""


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as file:
    for chunk in iter(lambda: file.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def available(directory: Path = DIRECTORY) -> list[str]:
  """The names of the shipped parameter files."""
  return sorted(path.stem for path in directory.glob('*.json'))


def load(name: str = 'mnist', directory: Path = DIRECTORY):
  """(model, params) of the pretrained model `name`.

  Raises:
    PretrainedError: unknown name, or a file whose checksum does not match.
  """
  meta_path = directory / f'{name}.json'
  weights_path = directory / f'{name}.npz'
  if not meta_path.exists():
    raise PretrainedError(f'no pretrained model {name!r} in {directory} '
                          f'(available: {", ".join(available(directory))})')
  meta = json.loads(meta_path.read_text())
  if not weights_path.exists():
    raise PretrainedError(f'{weights_path}: missing')
  actual = _sha256(weights_path)
  if actual != meta['sha256']:
    raise PretrainedError(f'{weights_path}: sha256 {actual} does not match '
                          f"{meta['sha256']} in {meta_path}: the file is "
                          'damaged or not the one shipped')
  with np.load(weights_path, allow_pickle=False) as arrays:
    flat = {tuple(key.split('/')): np.asarray(arrays[key])
            for key in arrays.files}
  params = jax.tree_util.tree_map(
      jax.numpy.asarray, traverse_util.unflatten_dict(flat))
  config = ml_collections.ConfigDict(meta['config'])
  return models.create_model(config), params


def export(workdir: str | Path, name: str, directory: Path = DIRECTORY,
           extra: dict[str, Any] | None = None) -> Path:
  """Writes the best-on-validation parameters of `workdir` as `name`."""
  restored = trained.restore_best(workdir)
  collections = models.state_collections(restored.config)
  if collections:
    raise PretrainedError(
        f'{workdir}: model.name={models.model_name(restored.config)!r} also '
        f'needs its {", ".join(collections)} to run, and this format holds '
        'parameters only')
  params = jax.device_get(restored.state.params)
  flat = {'/'.join(path): np.asarray(value) for path, value in
          traverse_util.flatten_dict(params).items()}
  directory.mkdir(parents=True, exist_ok=True)
  weights_path = directory / f'{name}.npz'
  np.savez(weights_path, **flat)
  test_results_path = Path(workdir) / 'test_results.json'
  meta = {
      'name': name,
      'sha256': _sha256(weights_path),
      'parameters': int(sum(value.size for value in flat.values())),
      'checkpoint_step': restored.step,
      'test_results': (json.loads(test_results_path.read_text())
                       if test_results_path.exists() else None),
      **(extra or {}),
      'config': json.loads(restored.config.to_json_best_effort()),
  }
  (directory / f'{name}.json').write_text(
      json.dumps(meta, indent=1, allow_nan=False) + '\n')
  return weights_path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True,
                      help='a finished python -m train.main workdir')
  parser.add_argument('--name', required=True, help="e.g. 'mnist'")
  parser.add_argument('--out', type=Path, default=DIRECTORY)
  args = parser.parse_args(argv)
  path = export(args.workdir, args.name, args.out)
  print(f'wrote {path} and {path.with_suffix(".json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
