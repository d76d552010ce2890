"""Both convolution methods (patches @ kernel, Fourier) equal lax's convolution."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from capsjax import convolution


def _reference_conv(images, kernel, stride):
  return lax.conv_general_dilated(
      images, kernel, (stride, stride), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST,
  )


@pytest.mark.parametrize('method', ['patches', 'fourier'])
@pytest.mark.parametrize(
    'image_size,channels,features,kernel_size,stride',
    [(28, 1, 16, 9, 1), (20, 32, 24, 9, 2), (11, 3, 5, 3, 3), (7, 4, 4, 7, 1),
     (13, 2, 3, 4, 2)],  # odd input, even kernel, 2 unused rows
)
def test_matches_lax_conv_value_and_gradients(
    image_size, channels, features, kernel_size, stride, method
):
  images = jax.random.normal(
      jax.random.key(0), (3, image_size, image_size, channels)
  )
  kernel = 0.1 * jax.random.normal(
      jax.random.key(1), (kernel_size, kernel_size, channels, features)
  )
  expected = _reference_conv(images, kernel, stride)

  def ours(x, w, stride):
    return convolution.conv2d(x, w, stride, method=method)

  chex.assert_trees_all_close(
      jax.jit(ours, static_argnums=2)(images, kernel, stride), expected,
      rtol=1e-4, atol=1e-4
  )
  cotangent = jax.random.normal(jax.random.key(2), expected.shape)

  def gradients(conv):
    return jax.jit(
        jax.grad(
            lambda x, w: jnp.sum(conv(x, w, stride) * cotangent),
            argnums=(0, 1),
        )
    )(images, kernel)

  chex.assert_trees_all_close(
      gradients(ours),
      gradients(_reference_conv),
      rtol=1e-4, atol=1e-4,
  )


@pytest.mark.parametrize('method', ['patches', 'fourier'])
def test_primary_caps_shape(method):
  images = jax.ShapeDtypeStruct((2, 20, 20, 256), jnp.float32)
  kernel = jax.ShapeDtypeStruct((9, 9, 256, 256), jnp.float32)
  result = jax.eval_shape(
      lambda x, w: convolution.conv2d(x, w, 2, method=method), images, kernel
  )
  chex.assert_shape(result, (2, 6, 6, 256))
  chex.assert_type(result, jnp.float32)


def test_auto_picks_fourier_only_where_it_pays():
  on_cpu = jax.default_backend() == 'cpu'
  many = convolution.FOURIER_MIN_IN_CHANNELS
  assert convolution.resolve_method('auto', None, many) == (
      'fourier' if on_cpu else 'patches')
  assert convolution.resolve_method('auto', jnp.float32, many) == (
      'fourier' if on_cpu else 'patches')
  # bfloat16 keeps the direct method; few input channels: the transforms
  # cost more.
  assert convolution.resolve_method('auto', jnp.bfloat16, many) == 'patches'
  assert convolution.resolve_method('auto', None, 1) == 'patches'
  assert convolution.resolve_method('fourier', jnp.bfloat16, 1) == 'fourier'
  assert convolution.resolve_method('patches', None, many) == 'patches'


def test_bfloat16_compute_is_close_and_returns_float32():
  images = jax.random.uniform(jax.random.key(0), (2, 12, 12, 8))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 8, 4))
  result = jax.jit(
      lambda x, w: convolution.conv2d(x, w, 1, compute_dtype=jnp.bfloat16)
  )(images, kernel)
  chex.assert_type(result, jnp.float32)
  chex.assert_trees_all_close(
      result, _reference_conv(images, kernel, 1), rtol=3e-2, atol=3e-2
  )


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='does not fit'):
    convolution.extract_patches(jnp.zeros((1, 4, 4, 1)), 5, 1)
  with pytest.raises(ValueError, match='channels'):
    convolution.conv2d(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 1, 4)))
  with pytest.raises(ValueError, match='square'):
    convolution.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 2, 1, 4)))
  with pytest.raises(ValueError, match='does not fit'):
    convolution.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((5, 5, 1, 1)),
                       method='fourier')
  with pytest.raises(ValueError, match="conv method 'direct'"):
    convolution.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 4)),
                       method='direct')


@pytest.mark.parametrize('method', ['patches', 'fourier'])
def test_rectangular_images(method):
  # An even grid on one axis and an odd one (the half spectrum's axis) on
  # the other: the Fourier method handles each axis on its own.
  images = jax.random.normal(jax.random.key(3), (2, 10, 13, 3))
  kernel = jax.random.normal(jax.random.key(4), (3, 3, 3, 2))
  chex.assert_trees_all_close(
      convolution.conv2d(images, kernel, 1, method=method),
      _reference_conv(images, kernel, 1), rtol=1e-4, atol=1e-4)
