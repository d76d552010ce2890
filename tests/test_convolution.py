"""Every convolution method (patches @ kernel, Fourier, lax) equals lax's
convolution, in value and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from capsjax import convolution


# numpy's generator: jax.random's threefry costs seconds of XLA:CPU
# compilation per shape.
def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


def _reference_conv(images, kernel, stride):
  return lax.conv_general_dilated(
      images, kernel, (stride, stride), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST,
  )


@pytest.mark.parametrize('method', ['patches', 'fourier', 'lax'])
@pytest.mark.parametrize(
    'image_size,channels,features,kernel_size,stride',
    [(28, 1, 16, 9, 1), (20, 32, 24, 9, 2), (11, 3, 5, 3, 3), (7, 4, 4, 7, 1),
     (13, 2, 3, 4, 2),  # odd input, even kernel, 2 unused rows
     (13, 1, 3, 4, 2), (11, 1, 5, 3, 3)],  # the same with one channel
)
def test_matches_lax_conv_value_and_gradients(
    image_size, channels, features, kernel_size, stride, method
):
  images = _normal(0, (3, image_size, image_size, channels)
  )
  kernel = 0.1 * _normal(1, (kernel_size, kernel_size, channels, features)
  )
  expected = _reference_conv(images, kernel, stride)

  def ours(x, w, stride):
    return convolution.conv2d(x, w, stride, method=method)

  chex.assert_trees_all_close(
      jax.jit(ours, static_argnums=2)(images, kernel, stride), expected,
      rtol=1e-4, atol=1e-4
  )
  cotangent = _normal(2, expected.shape)

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


@pytest.mark.parametrize('method', ['patches', 'fourier', 'lax'])
def test_primary_caps_shape(method):
  images = jax.ShapeDtypeStruct((2, 20, 20, 256), jnp.float32)
  kernel = jax.ShapeDtypeStruct((9, 9, 256, 256), jnp.float32)
  result = jax.eval_shape(
      lambda x, w: convolution.conv2d(x, w, 2, method=method), images, kernel
  )
  chex.assert_shape(result, (2, 6, 6, 256))
  chex.assert_type(result, jnp.float32)


# (images shape, kernel shape, stride) of the convolutions `resolve_method`
# was measured on, and what 'auto' picks for them on the CPU.
MEASURED_ON_THE_CPU = [
    ((128, 20, 20, 256), (9, 9, 256, 256), 2, 'fourier'),  # PrimaryCaps
    ((128, 28, 28, 1), (9, 9, 1, 256), 1, 'patches'),  # CapsNet conv1
    ((128, 32, 32, 256), (5, 5, 256, 256), 1, 'fourier'),  # baseline CNN
    ((128, 32, 32, 1), (5, 5, 1, 6), 1, 'patches'),  # LeNet-5
    ((128, 14, 14, 6), (5, 5, 6, 16), 1, 'patches'),
    ((16, 28, 28, 1), (5, 5, 1, 32), 1, 'patches'),  # Efficient-CapsNet
    ((16, 22, 22, 64), (3, 3, 64, 64), 1, 'patches'),
    ((16, 20, 20, 64), (3, 3, 64, 128), 2, 'patches'),
    ((8, 12, 12, 256), (1, 1, 256, 256), 1, 'patches'),  # 1x1: no saving
]


@pytest.mark.parametrize('platform', ['gpu', 'tpu', 'cuda', 'rocm'])
def test_auto_picks_lax_off_the_cpu(platform):
  # The backend's own convolutions (cuDNN, the TPU's) in every precision,
  # never materialised patches or the CPU's Fourier products.
  for dtype in (None, jnp.float32, jnp.bfloat16):
    for images_shape, kernel_shape, stride, _ in MEASURED_ON_THE_CPU:
      assert convolution.resolve_method(
          'auto', dtype, images_shape, kernel_shape, stride,
          platform=platform) == 'lax'


def test_auto_on_the_cpu_picks_fourier_only_where_it_pays():
  for dtype in (None, jnp.float32, jnp.bfloat16):
    for images_shape, kernel_shape, stride, expected in MEASURED_ON_THE_CPU:
      assert convolution.resolve_method(
          'auto', dtype, images_shape, kernel_shape, stride,
          platform='cpu') == expected, (images_shape, kernel_shape, stride)
  # The product ratio as its docstring writes it: PrimaryCaps reads a 19x19
  # grid, 10 x 19 frequencies, 6 x 6 outputs of 81 taps.
  assert convolution.fourier_product_ratio(20, 20, 9, 2) == pytest.approx(
      81 * 36 / (3 * 10 * 19))
  assert convolution.fourier_product_ratio(12, 12, 1) < 1
  # The default platform is the default backend's.
  shapes = MEASURED_ON_THE_CPU[0][:3]
  assert convolution.resolve_method('auto', None, *shapes) == (
      convolution.resolve_method('auto', None, *shapes,
                                 platform=jax.default_backend()))
  # An explicit method is kept everywhere.
  for method in ('patches', 'fourier', 'lax'):
    for platform in ('cpu', 'gpu'):
      assert convolution.resolve_method(method, jnp.bfloat16, *shapes,
                                        platform=platform) == method
  with pytest.raises(ValueError, match='conv method'):
    convolution.resolve_method('direct', None, *shapes)


@pytest.mark.parametrize('method', ['patches', 'fourier', 'lax'])
@pytest.mark.parametrize(
    'shape,kernel_size,stride,in_channels',
    [((12, 12), 3, 1, 8),   # an even grid
     ((12, 12), 5, 2, 8),   # strided, on an 11 x 11 (odd) grid
     ((10, 13), 3, 2, 8),   # rectangular: a 9 x 13 grid
     ((12, 12), 5, 1, 1)],  # one input channel (elementwise products)
)
def test_bfloat16_compute_is_close_in_value_and_gradients(
    method, shape, kernel_size, stride, in_channels):
  images = _uniform(0, (2, *shape, in_channels))
  kernel = 0.1 * _normal(1, (kernel_size, kernel_size, in_channels, 4))

  def ours(x, w):
    return convolution.conv2d(x, w, stride, jnp.bfloat16, method)

  def reference(x, w):
    return _reference_conv(x, w, stride)

  result = jax.jit(ours)(images, kernel)
  chex.assert_type(result, jnp.float32)
  chex.assert_trees_all_close(result, reference(images, kernel),
                              rtol=3e-2, atol=3e-2)
  cotangent = _normal(2, result.shape)

  def gradients(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) * cotangent),
                            argnums=(0, 1)))(images, kernel)

  ours_gradients = gradients(ours)
  chex.assert_trees_all_equal_dtypes(ours_gradients, (images, kernel))
  # Relative to the gradients' scale: bfloat16 keeps 8 significant bits.
  for got, expected in zip(ours_gradients, gradients(reference)):
    scale = float(jnp.max(jnp.abs(expected)))
    chex.assert_trees_all_close(got / scale, expected / scale, atol=3e-2)


def test_float32_einsum_gradients_are_autodiffs():
  # float32: autodiff's own rule; bfloat16: the cotangent rounded to
  # bfloat16, within bfloat16's precision of autodiff's float32 gradients.
  lhs = _normal(0, (3, 4, 5))
  rhs = _normal(1, (3, 5, 6))
  cotangent = _normal(2, (3, 4, 6))

  def gradients(compute_dtype):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(convolution.float32_einsum(
        'fmk,fkn->fmn', a, b, compute_dtype) * cotangent),
                            argnums=(0, 1)))(lhs, rhs)

  expected = jax.jit(jax.grad(lambda a, b: jnp.sum(
      jnp.einsum('fmk,fkn->fmn', a, b) * cotangent), argnums=(0, 1)))(lhs,
                                                                       rhs)
  chex.assert_trees_all_close(gradients(None), expected, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(gradients(jnp.bfloat16), expected, rtol=3e-2,
                              atol=5e-2)


@pytest.mark.parametrize('spec, lhs_shape, rhs_shape', [
    ('fmk,fkn->fmn', (3, 4, 5), (3, 5, 6)),      # the channel products
    ('bhwk,ko->bhwo', (2, 3, 4, 5), (5, 6)),     # a convolution by patches
    ('ko,km->om', (5, 6), (5, 7)),               # batch-minor patches
])
def test_bfloat16_einsum_gradients_with_the_lhs_reordered(spec, lhs_shape,
                                                          rhs_shape):
  # The backward pass reads the lhs stored with the rhs gradient's
  # contracted indices last; the gradients stay autodiff's within
  # bfloat16's precision, whatever the spec.
  lhs, rhs = _normal(0, lhs_shape), _normal(1, rhs_shape)
  cotangent = _normal(2, jnp.einsum(spec, lhs, rhs).shape)

  def gradients(einsum):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(einsum(a, b) * cotangent),
                            argnums=(0, 1)))(lhs, rhs)

  got = gradients(lambda a, b: convolution.float32_einsum(
      spec, a, b, jnp.bfloat16))
  expected = gradients(lambda a, b: jnp.einsum(spec, a, b))
  chex.assert_trees_all_close(got, expected, rtol=3e-2, atol=5e-2)


def test_lhs_order_for_rhs_gradient_puts_the_contracted_indices_last():
  order = convolution._lhs_order_for_rhs_gradient
  assert order('fmk,fkn->fmn') == 'fkm'
  assert order('bhwk,ko->bhwo') == 'kbhw'
  assert order('ko,km->om') == 'ko'  # already canonical: no copy


def test_materialized_transpose_is_the_transpose():
  array = _normal(0, (2, 3, 4))
  chex.assert_trees_all_equal(
      jax.jit(lambda a: convolution._materialized_transpose(a, (0, 2, 1)))(
          array), array.transpose(0, 2, 1))


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


@pytest.mark.parametrize('channels', [3, 1])
@pytest.mark.parametrize('method', ['patches', 'fourier', 'lax'])
def test_rectangular_images(method, channels):
  # An even grid on one axis and an odd one (the half spectrum's axis) on
  # the other: the Fourier method handles each axis on its own.
  images = _normal(3, (2, 10, 13, channels))
  kernel = _normal(4, (3, 3, channels, 2))
  chex.assert_trees_all_close(
      convolution.conv2d(images, kernel, 1, method=method),
      _reference_conv(images, kernel, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('height,width,kernel_size,stride',
                         [(28, 28, 9, 1), (13, 10, 4, 2), (11, 11, 3, 3)])
def test_tap_major_patches_are_the_patches_transposed(height, width,
                                                      kernel_size, stride):
  images = _normal(5, (3, height, width, 1))
  patches = convolution.extract_patches(images, kernel_size, stride)
  chex.assert_trees_all_equal(
      convolution.extract_tap_major_patches(images, kernel_size, stride),
      patches.reshape(-1, kernel_size**2).T)
  with pytest.raises(ValueError, match='one channel'):
    convolution.extract_tap_major_patches(
        jnp.zeros((1, height, width, 2)), kernel_size, stride)


def test_one_channel_patches_gradient_in_float32_and_bfloat16():
  # Float32 takes the tap-major product, bfloat16 the pixel-major one: both
  # give lax's kernel gradient (bfloat16 to its rounding).
  images = _normal(6, (4, 28, 28, 1))
  kernel = 0.1 * _normal(7, (9, 9, 1, 8))
  cotangent = _normal(8, (4, 20, 20, 8))

  def kernel_gradient(conv):
    return jax.jit(jax.grad(lambda w: jnp.sum(conv(images, w) * cotangent))
                   )(kernel)

  expected = kernel_gradient(lambda x, w: _reference_conv(x, w, 1))
  chex.assert_trees_all_close(
      kernel_gradient(lambda x, w: convolution.conv2d(x, w, 1,
                                                      method='patches')),
      expected, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(
      kernel_gradient(lambda x, w: convolution.conv2d(
          x, w, 1, jnp.bfloat16, method='patches')),
      expected, rtol=3e-2, atol=0.5)


def test_one_channel_patches_forward_mode_and_vmap():
  # The one-channel float32 path defines its own JVP: forward mode and
  # vmap must still give lax's values.
  images = _normal(9, (2, 3, 13, 11, 1))
  kernel = 0.1 * _normal(10, (4, 4, 1, 5))
  images_tangent = _normal(11, images.shape)
  kernel_tangent = _normal(12, kernel.shape)

  def jvp(conv):
    return jax.vmap(lambda x, x_dot: jax.jvp(
        conv, (x, kernel), (x_dot, kernel_tangent)))(images, images_tangent)

  chex.assert_trees_all_close(
      jvp(lambda x, w: convolution.conv2d(x, w, 2, method='patches')),
      jvp(lambda x, w: _reference_conv(x, w, 2)), rtol=1e-4, atol=1e-4)
