"""Robustness to rotations and affine transformations of trained models.

The command

    python -m train.robustness --models=[NAME=]SOURCE,... --out=DIR
        [--angles=-60:60:5] [--num_examples=-1] [--batch_size=250]
        [--pretrained_dir=DIR]

restores each model (SOURCE: a training workdir, whose best checkpoint on
validation and `config.json` it reads, or `pretrained:NAME` for shipped
parameters; NAME labels it, by default the workdir's or the shipped
model's name) and measures test accuracy on the MNIST
test set rotated by every angle of the sweep (default -60..60 in steps of 5,
including +-35), and on the affine set at the model's input size (28x28
models: affine digits on a 28x28 canvas; 40x40 affNIST-style models: on
40x40). It prints a table, and writes `robustness.json` and
`robustness.png` (accuracy against angle, one line per model) to --out.

The transforms themselves are in `train/transforms.py`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train import input_pipeline
from train import models
from train import reporting
from train import trained
from train import transforms

DEFAULT_ANGLES = tuple(range(-60, 61, 5))


# ---------------------------------------------------------------------------
# The command.


def accuracy_sweep(predict, images: np.ndarray, labels: np.ndarray,
                   angles: Sequence[float], affine_images: np.ndarray | None,
                   affine_labels: np.ndarray | None = None
                   ) -> dict[str, Any]:
  """Accuracy of `predict(images) -> (N,) classes` on each rotation and on
  the affine set."""
  result = {'angles': [float(a) for a in angles], 'accuracy': []}
  for angle in angles:
    predictions = predict(transforms.rotate(images, angle))
    result['accuracy'].append(float(np.mean(predictions == labels)))
  if affine_images is not None:
    result['affine_accuracy'] = float(
        np.mean(predict(affine_images) == affine_labels))
  return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A console table: one row per angle (and 'affine'), one column a model."""
  names = list(results)
  width = max([12] + [len(name) for name in names])
  lines = ['angle'.rjust(8) + ''.join(name.rjust(width + 2) for name in names)]
  angles = next(iter(results.values()))['angles'] if results else []
  for row, angle in enumerate(angles):
    lines.append(f'{angle:8.0f}' + ''.join(
        f'{results[name]["accuracy"][row]:{width + 2}.2%}' for name in names))
  if any('affine_accuracy' in r for r in results.values()):
    lines.append('affine'.rjust(8) + ''.join(
        (f'{results[name]["affine_accuracy"]:{width + 2}.2%}'
         if 'affine_accuracy' in results[name] else '-'.rjust(width + 2))
        for name in names))
  return '\n'.join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
  """accuracy vs angle, one line per model (affine accuracy in the legend)."""
  plt = reporting.pyplot()
  figure, axis = plt.subplots(figsize=(7, 4.5))
  for name, result in results.items():
    label = name
    if 'affine_accuracy' in result:
      label += f' (affine {result["affine_accuracy"]:.1%})'
    axis.plot(result['angles'], 100 * np.asarray(result['accuracy']),
              marker='o', markersize=3, label=label)
  axis.set_xlabel('rotation of the test set (degrees)')
  axis.set_ylabel('test accuracy (%)')
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def evaluate(source: str | Path, angles: Sequence[float],
             num_examples: int = -1, batch_size: int = 250,
             affine_seed: int = 0,
             pretrained_dir: Path | None = None) -> dict[str, Any]:
  """Restores the model of `source` (see `trained.load`) and sweeps it."""
  restored = trained.load(source, pretrained_dir)
  config = restored.config
  if config.dataset == 'multimnist':
    raise ValueError(f'{source}: a MultiMNIST model classifies pairs; the '
                     'rotation sweep is for single-digit models')
  splits = input_pipeline.load_source_splits(config)
  images, labels = splits.test_images, splits.test_labels
  if num_examples > 0:
    images, labels = images[:num_examples], labels[:num_examples]
  size = restored.image_shape[0]
  affine_images, affine_labels, _ = transforms.affine_test_set(
      images, labels, seed=affine_seed, canvas_size=size)
  if size != images.shape[1]:
    images = transforms.center_on_canvas(images, size)
  predict = trained.make_predict(restored, batch_size)
  result = accuracy_sweep(predict, images, labels, angles, affine_images,
                          affine_labels)
  result.update(source=str(source), checkpoint_step=restored.step,
                model=models.model_name(config), dataset=config.dataset,
                input_size=size, test_examples=int(len(labels)))
  return result


def parse_models(text: str) -> list[tuple[str, str]]:
  """'[NAME=]SOURCE,...' -> [(NAME, SOURCE)]; a workdir SOURCE is made
  absolute, and NAME defaults to its folder's or the shipped model's name."""
  models_ = []
  for item in (part for part in text.split(',') if part):
    name, separator, source = item.partition('=')
    if not separator:
      name, source = '', name
    if not source.startswith(trained.PRETRAINED_PREFIX):
      source = str(Path(source).expanduser().absolute())
    models_.append((name or Path(source).name.split(':')[-1], source))
  return models_


def _parse_angles(text: str) -> list[float]:
  """'-60:60:5' (inclusive range) or '0,35,-35'."""
  if ':' in text:
    start, stop, step = (float(part) for part in text.split(':'))
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [start + i * step for i in range(count)]
  return [float(part) for part in text.split(',') if part]


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Accuracy of trained models on rotated and affine-'
      'transformed MNIST test digits.')
  parser.add_argument('--models', required=True,
                      help="comma-separated '[NAME=]SOURCE': a training "
                      "workdir or 'pretrained:NAME'")
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--angles', default='-60:60:5',
                      help="'start:stop:step' (inclusive) or a list 'a,b,c'")
  parser.add_argument('--num_examples', type=int, default=-1,
                      help='first N test digits (-1: all 10000)')
  parser.add_argument('--batch_size', type=int, default=250)
  parser.add_argument('--affine_seed', type=int, default=0)
  parser.add_argument('--pretrained_dir', type=Path,
                      help="where 'pretrained:NAME' is (default: the "
                      "repository's train/pretrained)")
  args = parser.parse_args(argv)
  angles = _parse_angles(args.angles)
  out = Path(args.out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for name, source in parse_models(args.models):
    while name in results:
      name += "'"
    print(f'evaluating {source} ...', flush=True)
    results[name] = evaluate(source, angles, args.num_examples,
                             args.batch_size, args.affine_seed,
                             args.pretrained_dir)
  print(format_table(results))
  (out / 'robustness.json').write_text(json.dumps(results, indent=2) + '\n')
  plot(results, out / 'robustness.png')
  print(f'wrote {out / "robustness.json"} and {out / "robustness.png"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
