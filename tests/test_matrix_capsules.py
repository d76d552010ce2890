"""Matrix capsules with EM routing: votes, patches and coordinate addition
against hand computations, the layers' routing, and the smallNORB network's
parameter counts, outputs and gradients."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from capsjax import losses
from capsjax import matrix_capsules
from capsjax import routing

# Parameter initialisation compiles much faster with 'rbg' keys; no test
# here depends on the random values.
pytestmark = pytest.mark.usefixtures('fast_init_prng')

# Each EM routing takes seconds to compile; with the backend's optimisations
# off about half that, and the maths is the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def _compile(function, *args):
  return jax.jit(function).lower(*args).compile(compiler_options=FAST_COMPILE)


def _parameter_count(model, image_shape=(32, 32, 1)):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *image_shape)))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def _random_map(batch=2, height=5, width=5, types=2, seed=0):
  """Poses and activations of a capsule map, from NumPy: JAX's threefry
  random numbers take seconds to compile on a small CPU."""
  rng = np.random.default_rng(seed)
  poses = rng.normal(size=(batch, height, width, types, 4, 4))
  activations = rng.uniform(size=(batch, height, width, types))
  return jnp.asarray(poses, jnp.float32), jnp.asarray(activations, jnp.float32)


def _routing_params(kernel_shape, seed=1):
  """W of `kernel_shape`, scaled as the layers' default, and beta_u, beta_a
  away from zero for each output type (axis -3)."""
  rng = np.random.default_rng(seed)
  out_types = kernel_shape[-3]
  return {
      'weights': jnp.asarray(0.5 * rng.normal(size=kernel_shape), jnp.float32),
      'beta_u': jnp.asarray(rng.uniform(-0.3, 0.3, out_types), jnp.float32),
      'beta_a': jnp.asarray(rng.uniform(-0.3, 0.3, out_types), jnp.float32),
  }


# ---------------------------------------------------------------------------
# Pure functions.


def test_votes_are_pose_times_transformation_per_pair():
  rng = np.random.default_rng(0)
  poses = rng.normal(size=(2, 3, 3, 4, 4)).astype(np.float32)
  weights = rng.normal(size=(3, 5, 4, 4)).astype(np.float32)
  votes = matrix_capsules.matrix_votes(poses, weights)
  chex.assert_shape(votes, (2, 3, 3, 5, 4, 4))
  expected = np.zeros(votes.shape)
  for index in np.ndindex(2, 3):
    for i in range(3):
      for j in range(5):
        expected[index + (i, j)] = poses[index + (i,)] @ weights[i, j]
  np.testing.assert_allclose(votes, expected, rtol=1e-5, atol=1e-5)
  # V_ij = M_i W_ij, not W_ij M_i.
  assert not np.allclose(
      votes[0, 0, 0, 0], weights[0, 0] @ poses[0, 0, 0], atol=1e-3)


def test_votes_reject_mismatched_shapes():
  with pytest.raises(ValueError, match='do not match'):
    matrix_capsules.matrix_votes(jnp.zeros((2, 3, 4, 4)),
                                 jnp.zeros((4, 5, 4, 4)))


@pytest.mark.parametrize('kernel_size, stride', [(3, 2), (3, 1), (2, 3)])
def test_patches_match_a_naive_loop(kernel_size, stride):
  poses, activations = _random_map(height=5, width=6)
  patch_poses, patch_activations = matrix_capsules.capsule_patches(
      poses, activations, kernel_size, stride)
  out_height = (5 - kernel_size) // stride + 1
  out_width = (6 - kernel_size) // stride + 1
  chex.assert_shape(patch_poses,
                    (2, out_height, out_width, kernel_size**2 * 2, 4, 4))
  chex.assert_shape(patch_activations,
                    (2, out_height, out_width, kernel_size**2 * 2))
  poses, activations = np.asarray(poses), np.asarray(activations)
  for b, y, x in np.ndindex(2, out_height, out_width):
    capsule = 0
    for row in range(kernel_size):
      for col in range(kernel_size):
        for kind in range(2):
          source = (b, stride * y + row, stride * x + col, kind)
          np.testing.assert_array_equal(patch_poses[b, y, x, capsule],
                                        poses[source])
          np.testing.assert_array_equal(patch_activations[b, y, x, capsule],
                                        activations[source])
          capsule += 1


def test_receptive_field_centres_match_the_pixels_seen():
  layers = matrix_capsules.MatrixCapsNet.LAYERS
  centres = matrix_capsules.receptive_field_centres(32, layers)
  # Each final cell's input pixels, walked back layer by layer; the centre
  # of pixels first..last is (first + last + 1) / 2.
  for cell, centre in enumerate(centres):
    first, last = cell, cell
    for kernel_size, stride in reversed(layers):
      first, last = stride * first, stride * last + kernel_size - 1
    np.testing.assert_allclose(centre, (first + last + 1) / 2 / 32)
  np.testing.assert_allclose(centres, (4 * np.arange(4) + 8.5) / 32)


def test_coordinate_addition_changes_only_the_right_column_top_two():
  votes = jnp.asarray(
      np.random.default_rng(0).normal(size=(2, 3, 4, 2, 5, 4, 4)), jnp.float32)
  added = matrix_capsules.coordinate_addition(votes)
  difference = np.asarray(added - votes)
  changed = np.zeros((4, 4), bool)
  changed[0, 3] = changed[1, 3] = True
  np.testing.assert_array_equal(difference[..., ~changed], 0.0)
  # The default coordinates: each cell's centre as a fraction of the map.
  rows = (np.arange(3) + 0.5) / 3
  columns = (np.arange(4) + 0.5) / 4
  np.testing.assert_allclose(
      difference[..., 0, 3],
      np.broadcast_to(rows[None, :, None, None, None], (2, 3, 4, 2, 5)),
      atol=1e-6)
  np.testing.assert_allclose(
      difference[..., 1, 3],
      np.broadcast_to(columns[None, None, :, None, None], (2, 3, 4, 2, 5)),
      atol=1e-6)
  # Given coordinates are added as they are.
  given = matrix_capsules.coordinate_addition(
      jnp.zeros((1, 2, 2, 4, 4)), jnp.array([0.1, 0.2]), jnp.array([0.3, 0.7]))
  np.testing.assert_allclose(given[0, :, :, 0, 3], [[0.1, 0.1], [0.2, 0.2]])
  np.testing.assert_allclose(given[0, :, :, 1, 3], [[0.3, 0.7], [0.3, 0.7]])
  with pytest.raises(ValueError, match='coordinates'):
    matrix_capsules.coordinate_addition(jnp.zeros((1, 2, 2, 4, 4)),
                                        jnp.zeros(3))


# ---------------------------------------------------------------------------
# Layers.


def test_primary_capsules_shapes_range_and_parameters():
  features = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 6)),
                         jnp.float32)
  layer = matrix_capsules.PrimaryMatrixCapsules(capsule_types=5)
  variables = layer.init(jax.random.key(1), features)
  output = layer.apply(variables, features)
  chex.assert_shape(output.poses, (2, 3, 3, 5, 4, 4))
  chex.assert_shape(output.activations, (2, 3, 3, 5))
  assert bool(jnp.all((output.activations > 0) & (output.activations < 1)))
  assert output.coupling is None
  count = sum(leaf.size for leaf in jax.tree.leaves(variables))
  assert count == 17 * 5 * (6 + 1)


def test_conv_capsules_route_each_patch_with_the_shared_transformations():
  poses, activations = _random_map(height=5, width=5, types=2)
  layer = matrix_capsules.ConvMatrixCapsules(capsule_types=3, kernel_size=3,
                                             stride=2)
  shapes = jax.eval_shape(layer.init, jax.random.key(1), poses, activations)
  chex.assert_shape(shapes['params']['weights'], (3, 3, 2, 3, 4, 4))
  params = _routing_params((3, 3, 2, 3, 4, 4))

  def apply(params, poses, activations):
    return layer.apply({'params': params}, poses, activations,
                       return_coupling=True)

  output = _compile(apply, params, poses, activations)(
      params, poses, activations)
  chex.assert_shape(output.poses, (2, 2, 2, 3, 4, 4))
  chex.assert_shape(output.activations, (2, 2, 2, 3))
  chex.assert_shape(output.coupling, (2, 2, 2, 18, 3))
  # Every input capsule's assignments sum to one over its parents.
  chex.assert_trees_all_close(output.coupling.sum(-1), jnp.ones((2, 2, 2, 18)),
                              atol=1e-5)
  assert bool(jnp.all((output.activations > 0) & (output.activations < 1)))
  # Position (1, 0) of example 1, by the pure functions: its patch starts at
  # row 2, column 0 of the input map.
  patch_poses = poses[1, 2:5, 0:3].reshape(18, 4, 4)
  patch_activations = activations[1, 2:5, 0:3].reshape(18)
  votes = matrix_capsules.matrix_votes(
      patch_poses, params['weights'].reshape(18, 3, 4, 4))
  expected = _compile(routing.em_routing, votes[None],
                      patch_activations[None], params['beta_u'],
                      params['beta_a'])(
                          votes[None], patch_activations[None],
                          params['beta_u'], params['beta_a'])
  chex.assert_trees_all_close(output.poses[1, 1, 0], expected.poses[0],
                              atol=1e-5)
  chex.assert_trees_all_close(output.activations[1, 1, 0],
                              expected.activations[0], atol=1e-6)


def test_conv_capsules_treat_equal_patches_alike():
  """W is shared across positions: a map the same everywhere gives an
  output the same everywhere."""
  poses, activations = _random_map(batch=1, height=1, width=1, types=2)
  poses = jnp.broadcast_to(poses, (1, 4, 4, 2, 4, 4))
  activations = jnp.broadcast_to(activations, (1, 4, 4, 2))
  layer = matrix_capsules.ConvMatrixCapsules(capsule_types=2, kernel_size=3)
  params = _routing_params((3, 3, 2, 2, 4, 4))
  apply = lambda params, *capsules: layer.apply({'params': params}, *capsules)
  output = _compile(apply, params, poses, activations)(
      params, poses, activations)
  chex.assert_shape(output.activations, (1, 2, 2, 2))
  for y, x in np.ndindex(2, 2):
    chex.assert_trees_all_close(output.poses[0, y, x], output.poses[0, 0, 0],
                                atol=1e-5)
    chex.assert_trees_all_close(output.activations[0, y, x],
                                output.activations[0, 0, 0], atol=1e-6)


def test_class_capsules_see_positions_only_through_coordinate_addition():
  poses, activations = _random_map(batch=1, height=2, width=2, types=2)
  # Swap the capsules of two positions.
  swapped_poses = poses[:, ::-1]
  swapped_activations = activations[:, ::-1]
  params = _routing_params((2, 3, 4, 4))
  results = {}
  for addition in (True, False):
    layer = matrix_capsules.ClassMatrixCapsules(
        num_classes=3, use_coordinate_addition=addition)

    def apply(params, poses, activations, layer=layer):
      return layer.apply({'params': params}, poses, activations,
                         return_coupling=True)

    apply = _compile(apply, params, poses, activations)
    original = apply(params, poses, activations)
    moved = apply(params, swapped_poses, swapped_activations)
    chex.assert_shape(original.poses, (1, 3, 4, 4))
    chex.assert_shape(original.coupling, (1, 8, 3))
    chex.assert_trees_all_close(original.coupling.sum(-1), jnp.ones((1, 8)),
                                atol=1e-5)
    assert bool(jnp.all((original.activations > 0)
                        & (original.activations < 1)))
    results[addition] = np.abs(original.poses - moved.poses).max()
  assert results[False] < 1e-5  # W shared: a set of votes, no positions.
  assert results[True] > 1e-3


# ---------------------------------------------------------------------------
# The network.


def test_parameter_counts_of_the_papers_networks():
  # 832 + 17,952 + 147,520 + 147,520 + 2,570: the paper's "310K".
  assert _parameter_count(capsjax.MatrixCapsNet()) == 316_394
  # 1,664 + 8,840 + 18,464 + 36,896 + 1,290: the paper's "68K".
  assert _parameter_count(capsjax.MatrixCapsNet(64, 8, 16, 16)) == 67_154


def test_parameter_shapes_of_each_layer():
  shapes = jax.eval_shape(capsjax.MatrixCapsNet(64, 8, 16, 16).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  params = shapes['params']
  chex.assert_shape(params['conv1']['kernel'], (5, 5, 1, 64))
  chex.assert_shape(params['primary_capsules']['pose']['kernel'], (64, 128))
  chex.assert_shape(params['primary_capsules']['activation']['kernel'],
                    (64, 8))
  chex.assert_shape(params['conv_caps1']['weights'], (3, 3, 8, 16, 4, 4))
  chex.assert_shape(params['conv_caps2']['weights'], (3, 3, 16, 16, 4, 4))
  chex.assert_shape(params['class_capsules']['weights'], (16, 5, 4, 4))
  chex.assert_shape(params['class_capsules']['beta_u'], (5,))


# Two routing iterations: the fewest that run an E-step, where a collapsed
# variance would divide by zero.
TINY = dict(A=4, B=3, C=2, D=2, num_iterations=2)
LABELS = jnp.array([1, 4, 0])


@pytest.fixture(scope='module')
def tiny_network():
  """The network with few capsules, its parameters, three images, and the
  spread loss's value, outputs and gradients on a batch of three, compiled
  once for the tests below."""
  model = capsjax.MatrixCapsNet(**TINY)
  images = jnp.asarray(
      np.random.default_rng(0).uniform(size=(3, 32, 32, 1)), jnp.float32)
  params = _compile(model.init, jax.random.key(1), images[:1])(
      jax.random.key(1), images[:1])['params']

  def loss(params, images):
    output = model.apply({'params': params}, images, return_coupling=True)
    return jnp.mean(
        losses.spread_loss(output.activations, LABELS, 0.2)), output

  loss_and_gradients = _compile(jax.value_and_grad(loss, has_aux=True),
                                params, images)
  return model, params, images, loss_and_gradients


def test_network_outputs_and_batch_independence(tiny_network):
  model, params, images, loss_and_gradients = tiny_network
  (_, in_batch), _ = loss_and_gradients(params, images)
  chex.assert_shape(in_batch.poses, (3, 5, 4, 4))
  chex.assert_shape(in_batch.activations, (3, 5))
  chex.assert_shape(in_batch.coupling, (3, 4 * 4 * 2, 5))
  # A logistic: in (0, 1), though float32 rounds a logit above ~17 to 1.
  assert bool(jnp.all((in_batch.activations > 0)
                      & (in_batch.activations <= 1)))
  assert float(jnp.min(in_batch.activations)) < 0.99
  # Every ConvCaps2 capsule's assignments sum to one over the classes.
  chex.assert_trees_all_close(in_batch.coupling.sum(-1), jnp.ones((3, 32)),
                              atol=1e-5)

  def apply(params, images):
    return model.apply({'params': params}, images, return_coupling=True)

  alone = _compile(apply, params, images[:1])(params, images[:1])
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], alone),
      jax.tree.map(lambda x: x[0], in_batch), rtol=1e-5, atol=1e-5)


def test_network_gradients_are_finite_even_on_blank_images(tiny_network):
  """A blank image with zero biases makes every primary pose zero, so all
  the votes of a convolutional capsule agree exactly: sigma^2 = 0 without
  the epsilon."""
  _, params, _, loss_and_gradients = tiny_network
  (value, _), gradients = loss_and_gradients(params,
                                             jnp.zeros((3, 32, 32, 1)))
  chex.assert_tree_all_finite((value, gradients))
  assert jax.tree.structure(gradients) == jax.tree.structure(params)
  # The class capsules still learn (their votes differ by position).
  assert float(jnp.abs(gradients['class_capsules']['beta_a']).sum()) > 0
