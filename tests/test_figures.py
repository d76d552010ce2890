"""The reconstruction, dimension-perturbation and MultiMNIST figures."""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

import capsjax
from train import figures

# 'rbg' keys: see conftest.fast_init_prng.
pytestmark = pytest.mark.usefixtures('fast_init_prng')


TINY = dict(conv_features=8, primary_capsule_types=2, decoder_hidden_sizes=(16,))


def test_perturbation_offsets():
  capsules = jnp.zeros((10, 16))
  perturbed = figures.perturbed_capsules(capsules, 3)
  assert perturbed.shape == (16, 11, 10, 16)
  assert figures.PERTURBATIONS[0] == -0.25 and figures.PERTURBATIONS[-1] == 0.25
  np.testing.assert_allclose(perturbed[5, :, 3, 5], figures.PERTURBATIONS,
                             atol=1e-7)
  # Only dimension d of the chosen capsule moves in row d.
  changed = np.asarray(perturbed != 0)
  assert changed.sum() == 16 * 10  # the middle column (0.0) is unchanged
  assert changed[:, :, 3].sum() == changed.sum()


def test_mosaic_size():
  grid = np.zeros((16, 11, 28, 28, 1))
  assert figures.mosaic(grid).shape == (16 * 29 - 1, 11 * 29 - 1)


@pytest.fixture(scope='module')
def tiny_model():
  model = capsjax.CapsNet(**TINY)
  images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(1), images[:1])['params']
  return model, params, np.asarray(images), jax.jit(model.apply)


def test_figures_are_written(tiny_model, tmp_path):
  model, params, images, apply = tiny_model
  written = figures.draw_all(model, params, images, np.array([1, 2, 3]),
                             tmp_path, perturb=(1,), apply=apply)
  assert [p.name for p in written] == ['reconstructions.png',
                                       'perturbation_1.png']
  perturbation = plt.imread(tmp_path / 'perturbation_1.png')
  # 16 rows x 11 columns of 28x28 tiles, 1-pixel gaps, 3x magnified.
  assert perturbation.shape[:2] == ((16 * 29 - 1) * 3, (11 * 29 - 1) * 3)
  assert (tmp_path / 'reconstructions.png').stat().st_size > 1000


def test_perturbation_grid_decodes_each_copy(tiny_model):
  model, params, images, apply = tiny_model
  # Labels (3, 2) as in test_multimnist_figure: one compilation for both.
  output = apply({'params': params}, images, jnp.array([[4, 0]] * 3))
  grid = figures.perturbation_grid(model, params, output.capsules[0], 4,
                                   (28, 28, 1))
  assert grid.shape == (16, 11, 28, 28, 1)
  # The unperturbed column decodes the capsule as the model's decoder does.
  direct = output.reconstructions[0, 0]
  for row in range(16):
    np.testing.assert_allclose(grid[row, 5], direct, atol=1e-5)


def test_multimnist_figure(tiny_model, tmp_path):
  # Any canvas size draws the same way (MultiMNIST's is 36x36).
  model, params, images, apply = tiny_model
  written = figures.draw_all(model, params, images,
                             np.array([[1, 2], [3, 4], [5, 6]]), tmp_path,
                             perturb=(), apply=apply)
  assert [p.name for p in written] == ['multimnist.png']
  assert plt.imread(written[0]).shape[2] in (3, 4)
  colours = figures.two_colour(np.ones((1, 2, 4, 4, 1)))
  np.testing.assert_array_equal(colours[0, 0, 0], [1, 1, 0])
