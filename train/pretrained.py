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

    python -m train.pretrained --workdir=DIR --name=mnist \
        [--record=results/mnist_r3_recon.json] \
        [--robustness=results/robustness_mnist.json]

exports the best checkpoint on validation of a finished training workdir,
and writes its model card from the workdir's test results and, when given,
the run's reproduction record (training length, time, machine, validation
curve) and robustness record: every figure in the card comes from them.
Without --workdir it rewrites the card of the exported --name (e.g. once
the robustness record exists). `python -m train.reproduce` does both for
the rows it ships.
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

from train import input_pipeline
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
  restored = restore(name, directory)
  return restored.model, restored.params


def restore(name: str, directory: Path = DIRECTORY) -> trained.Restored:
  """The pretrained model `name` as a `trained.Restored` (config, params,
  the training step they come from), as `trained.load('pretrained:NAME')`
  returns it.

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
  return trained.Restored(config, {'params': params},
                          int(meta['checkpoint_step']),
                          input_pipeline.image_shape(config))


def _is_capsule_model(config: dict[str, Any]) -> bool:
  return config.get('model', {}).get('name', 'capsnet') in (
      'capsnet', 'efficient_capsnet')


def _model_line(config: dict[str, Any]) -> str:
  model = config.get('model', {})
  line = f"- model: `{model.get('name', 'capsnet')}`"
  if _is_capsule_model(config):
    line += (f", routing `{model.get('routing', 'dynamic')}`, "
             f"{model.get('routing_iterations', 3)} routing iterations, "
             f"reconstruction weight {config.get('reconstruction_weight')}")
    if models.official_layers(config):
      line += ("; the official code's initialisation and class capsule "
               "bias (`official_layers`), PrimaryCaps' convolution x"
               f"{model.get('primary_capsule_scale')}")
  return line


def _shift_kind(config: dict[str, Any]) -> str:
  if input_pipeline.subpixel_shifts(config):
    return ' (real shifts, interpolated bilinearly)'
  return ''


def _percent(value: float) -> str:
  return f'{100 * value:.2f}%'


def model_card(meta: dict[str, Any], record: dict[str, Any] | None = None,
               robustness: dict[str, Any] | None = None) -> str:
  """The Markdown model card of exported parameters (`meta`: their JSON),
  from their test results and the optional reproduction and robustness
  records."""
  config = meta['config']
  test = meta['test_results'] or {}
  lines = [
      f"# {meta['name']}: capsjax model card", '',
      f"`train.pretrained.load({meta['name']!r})` returns the model and its "
      f"{meta['parameters']:,} parameters (best checkpoint on validation, "
      f"step {meta['checkpoint_step']}); call it as `model.apply({{'params': "
      "params}, images)` on `(N, H, W, 1)` float32 images in [0, 1].", '',
      '## Model and data', '',
      _model_line(config),
      f"- data: {config.get('dataset')}, the last "
      f"{config.get('validation_size')} training images held out for "
      f"validation, random shifts of up to {config.get('max_shift'):g} "
      f"pixels{_shift_kind(config)}",
      f"- optimisation: Adam, learning rate {config.get('learning_rate')} "
      f"decayed x{config.get('learning_rate_decay_rate')} every "
      f"{config.get('learning_rate_decay_steps')} steps, batch "
      f"{config.get('batch_size')}, {config.get('precision')}, seed "
      f"{config.get('seed')}",
  ]
  if config.get('parameter_average_decay', 0.0) > 0:
    lines.append(
        "- parameters: the training's moving average of them (decay "
        f"{config['parameter_average_decay']} a step, `train/averaging.py`)"
        ', not its last step')
  if record:
    machine = record['machine']
    lines += [
        f"- trained: {record['epochs']:g} epochs ({record['steps']} steps), "
        f"{record['train_hours']:.1f} h on a {machine['cpu_count']}-core "
        f"{machine['cpu']}, commit {record['commit']}; "
        f"`{record['command']}`",
        f"- best validation accuracy at epoch {record['best_epoch']:g}; the "
        f"paper: {record['paper']} ({record['paper_length']})"]
  lines += ['', '## Results', '']
  if test:
    lines += [f"- test error {_percent(test['test_error'])} on "
              f"{test['test_examples']:,} test images (validation accuracy "
              f"{_percent(test['validation_accuracy'])})"]
  if robustness:
    for model_name, result in robustness['results'].items():
      by_angle = dict(zip(result['angles'], result['accuracy']))
      shown = [angle for angle in (0, 15, 30, 35, 45, 60, 90)
               if angle in by_angle]
      sample = result.get('test_examples', -1)
      digits = (f' (both from the first {sample:,} test digits)'
                if 0 < sample < test.get('test_examples', 10_000) else '')
      lines.append(f'- {model_name}, rotated test set: ' + ', '.join(
          f'{angle:g} deg {_percent(by_angle[angle])}' for angle in shown)
                   + f"; affine test set {_percent(result['affine_accuracy'])}"
                   + digits)
  lines += ['', '## Known limits', '',
            '- Trained on MNIST digits centred in 28x28 images: other '
            'sizes, inverted or colour images are out of its distribution; '
            'rotations beyond about 30 degrees cost accuracy (above).',
            ('- The class is the longest capsule; the lengths are not '
             'calibrated probabilities.' if _is_capsule_model(config) else
             '- The class is the largest logit; its softmax is not a '
             'calibrated probability.'),
            '- One model, one seed: the spread between seeds is in the '
            "ablation's seeded settings of docs/reproduction.md.", '']
  return '\n'.join(lines)


def export(workdir: str | Path, name: str, directory: Path = DIRECTORY,
           extra: dict[str, Any] | None = None,
           record: dict[str, Any] | None = None,
           robustness: dict[str, Any] | None = None) -> Path:
  """Writes the best-on-validation parameters of `workdir` as `name`, with
  their JSON and model card."""
  restored = trained.restore_best(workdir)
  collections = models.state_collections(restored.config)
  if collections:
    raise PretrainedError(
        f'{workdir}: model.name={models.model_name(restored.config)!r} also '
        f'needs its {", ".join(collections)} to run, and this format holds '
        'parameters only')
  params = jax.device_get(restored.params)
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
  write_card(name, directory, record, robustness)
  return weights_path


def write_card(name: str, directory: Path = DIRECTORY,
               record: dict[str, Any] | None = None,
               robustness: dict[str, Any] | None = None) -> Path:
  """(Re)writes the model card `<name>.md` of exported parameters from their
  JSON and the given records."""
  meta_path = directory / f'{name}.json'
  if not meta_path.exists():
    raise PretrainedError(f'no pretrained model {name!r} in {directory}')
  path = directory / f'{name}.md'
  path.write_text(model_card(json.loads(meta_path.read_text()), record,
                             robustness))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir',
                      help='a finished python -m train.main workdir (without '
                      'it: rewrite the model card of the exported --name)')
  parser.add_argument('--name', required=True, help="e.g. 'mnist'")
  parser.add_argument('--out', type=Path, default=DIRECTORY)
  parser.add_argument('--record', type=Path,
                      help="the run's reproduction record (results/ROW.json)")
  parser.add_argument('--robustness', type=Path,
                      help='a robustness record (results/ROW.json)')
  args = parser.parse_args(argv)
  records = {}
  for field in ('record', 'robustness'):
    path = getattr(args, field)
    if path is not None:
      try:
        records[field] = json.loads(path.read_text())
      except (OSError, ValueError) as error:
        parser.error(f'--{field}={path}: {error}')
  if 'robustness' in records and 'results' not in records['robustness']:
    parser.error(f'--robustness={args.robustness}: not a robustness record')
  if args.workdir is None:
    print(f'wrote {write_card(args.name, args.out, **records)}')
    return 0
  path = export(args.workdir, args.name, args.out, **records)
  print(f'wrote {path}, {path.with_suffix(".json")} and '
        f'{path.with_suffix(".md")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
