"""The library installs light: `capsjax` needs only the maths' packages; the
training program's come with the `train` extra."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip('tomllib')

REPO_ROOT = Path(__file__).resolve().parents[1]
MATHS = {'jax', 'flax', 'optax', 'chex', 'numpy'}
TRAINING_ONLY = ('orbax', 'tensorflow_datasets', 'matplotlib', 'ml_collections',
                 'tensorboardX')


def _names(requirements):
  return {re.split(r'[\s<>=!~\[;]', requirement, maxsplit=1)[0].lower()
          for requirement in requirements}


def test_core_dependencies_are_the_maths_ones():
  project = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']
  assert _names(project['dependencies']) == MATHS
  extras = project['optional-dependencies']
  assert {'orbax-checkpoint', 'tensorflow-datasets', 'ml_collections',
          'matplotlib', 'tensorboardx'} <= _names(extras['train'])
  assert {'pytest', 'pytest-xdist'} <= _names(extras['test'])
  assert extras['cuda12'] == ['jax[cuda12]']


def test_importing_capsjax_loads_no_training_package():
  script = ('import sys, capsjax; '
            f'print(sorted(m for m in sys.modules if m.split(".")[0] in '
            f'{TRAINING_ONLY!r}))')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip() == '[]', result.stdout


def test_training_program_runs_from_any_folder(tmp_path):
  """`train` is installed with the project: `python -m train.main` needs no
  repository checkout as the working folder."""
  result = subprocess.run([sys.executable, '-m', 'train.main', '--help'],
                          cwd=tmp_path, capture_output=True, text=True)
  # absl's --help exits with status 1.
  assert 'Traceback' not in result.stderr, result.stderr
  assert '--workdir' in result.stdout
