"""Thin Flax linen modules over the pure capsule functions.

Every module takes a `dtype`: the compute dtype of its matrix multiplies
(float32 by default; bfloat16 for mixed precision). Parameters stay float32,
and squash, norms, routing and softmax always run in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from capsjax import convolution
from capsjax import routing
from capsjax.nonlinearity import capsule_lengths, squash

Dtype = Any
Initializer = Callable[..., jax.Array]


class Conv2D(nn.Module):
  """VALID square convolution by patches @ kernel or the convolution theorem
  (`convolution`).

  Same parameters ('kernel' HWIO, 'bias') and initialisers as `nn.Conv`, but
  its backward pass avoids XLA:CPU's slow strided-convolution gradient.
  `method`: 'auto' (`convolution.resolve_method`: on the CPU Fourier where
  it pays, else patches; 'lax' elsewhere), 'patches', 'fourier' or 'lax'.

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> ones = nn.initializers.ones
  >>> conv = Conv2D(features=3, kernel_size=2, kernel_init=ones)
  >>> images = jnp.ones((1, 3, 3, 2))
  >>> outputs, variables = conv.init_with_output(jax.random.key(0), images)
  >>> jax.tree.map(jnp.shape, variables['params'])
  {'bias': (3,), 'kernel': (2, 2, 2, 3)}
  >>> outputs[0, :, :, 0].tolist()  # each a sum of 2 * 2 * 2 ones
  [[8.0, 8.0], [8.0, 8.0]]
  >>> flax_conv = nn.Conv(3, (2, 2), padding='VALID')  # the same parameters
  >>> bool(jnp.allclose(flax_conv.apply(variables, images), outputs))
  True
  """

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  method: str = 'auto'
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """`(batch, height, width, channels)` -> `(batch, h', w', features)`, f32."""
    kernel = self.param(
        'kernel',
        self.kernel_init,
        (self.kernel_size, self.kernel_size, images.shape[-1], self.features),
    )
    outputs = convolution.conv2d(images, kernel, self.stride, self.dtype,
                                 self.method)
    if self.use_bias:
      outputs = outputs + self.param('bias', self.bias_init, (self.features,))
    return outputs


class PrimaryCapsules(nn.Module):
  """Convolutional capsules: conv, group channels into vectors, squash.

  Each capsule is `capsule_dim` consecutive channels at one position (never
  a group of positions, a pitfall of NCHW ports), so a `(h, w,
  capsule_types * capsule_dim)` map gives `h * w * capsule_types` capsules.

  >>> import jax, jax.numpy as jnp
  >>> layer = PrimaryCapsules(capsule_types=2, capsule_dim=4, kernel_size=3)
  >>> features = jnp.ones((1, 5, 5, 4))
  >>> shapes = jax.eval_shape(layer.init, jax.random.key(0), features)
  >>> jax.tree.map(jnp.shape, shapes['params'])
  {'Conv2D_0': {'bias': (8,), 'kernel': (3, 3, 4, 8)}}
  >>> variables = jax.tree.map(lambda p: jnp.full(p.shape, 0.01), shapes)
  >>> capsules = layer.apply(variables, features)
  >>> capsules.shape  # 2 x 2 positions x 2 types, of 4D
  (1, 8, 4)
  >>> # Each channel is 3 * 3 * 4 * 0.01 + 0.01 = 0.37, so |s| = 0.74 and
  >>> # the squashed length is 0.74^2 / (1 + 0.74^2).
  >>> round(float(capsule_lengths(capsules)[0, 0]), 4)
  0.3538
  """

  capsule_types: int = 32
  capsule_dim: int = 8
  kernel_size: int = 9
  stride: int = 2
  # Multiplies the convolution, not its bias: s = scale * (W * x) + b. The
  # official code's capsule layer computes its primary capsules so, with
  # 1/32 (one routing iteration over 32 zero logits); the paper has no
  # scale (1.0).
  output_scale: float = 1.0
  dtype: Dtype = jnp.float32
  conv_method: str = 'auto'  # `Conv2D.method`
  kernel_init: Initializer = Conv2D.kernel_init
  bias_init: Initializer = Conv2D.bias_init

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """`(batch, h, w, c)` -> capsules `(batch, h' * w' * types, dim)`, f32."""
    if self.output_scale != 1.0:
      # The convolution is linear: scaling its input scales W * x alone.
      features = self.output_scale * features
    maps = Conv2D(
        self.capsule_types * self.capsule_dim,
        self.kernel_size,
        self.stride,
        dtype=self.dtype,
        method=self.conv_method,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
    )(features)
    capsules = maps.reshape(features.shape[0], -1, self.capsule_dim)
    return squash(capsules.astype(jnp.float32))


class CapsuleLayer(nn.Module):
  """A fully connected capsule layer: prediction vectors, then routing.

  Holds W `(in_capsules, out_capsules, in_dim, out_dim)`, no bias, as the
  paper's DigitCaps (1152 x 10 matrices of 8 x 16), and the learned arrays of
  the routing algorithm (`routing.route`): 'dynamic' and 'none' have none,
  'em' has beta_u and beta_a `(out_capsules,)`, 'self_attention' the log
  priors B `(in_capsules, out_capsules)`; all start at zero. With 'em' the
  out_dim-vector votes are the flattened poses.

  >>> import jax, jax.numpy as jnp
  >>> capsules, activations = jnp.ones((2, 1152, 8)), jnp.ones((2, 1152))
  >>> key = jax.random.key(0)
  >>> layer = CapsuleLayer(out_capsules=10, out_dim=16)
  >>> out, variables = jax.eval_shape(layer.init_with_output, key, capsules)
  >>> out.poses.shape, out.activations.shape
  ((2, 10, 16), (2, 10))
  >>> jax.tree.map(jnp.shape, variables['params'])
  {'weights': (1152, 10, 8, 16)}
  >>> em = CapsuleLayer(10, 16, routing='em')
  >>> shapes = jax.eval_shape(em.init, key, capsules, activations)
  >>> jax.tree.map(jnp.shape, shapes['params'])
  {'beta_a': (10,), 'beta_u': (10,), 'weights': (1152, 10, 8, 16)}
  >>> attention = CapsuleLayer(10, 16, routing='self_attention')
  >>> shapes = jax.eval_shape(attention.init, key, capsules)
  >>> jax.tree.map(jnp.shape, shapes['params'])
  {'log_priors': (1152, 10), 'weights': (1152, 10, 8, 16)}
  """

  out_capsules: int
  out_dim: int
  routing_iterations: int = 3
  stop_gradient_intermediate: bool = False
  dtype: Dtype = jnp.float32
  weight_init: Initializer = nn.initializers.normal(stddev=0.01)
  routing: str = 'dynamic'  # one of `routing.ALGORITHMS`
  # 'dynamic' only: a bias `(out_capsules, out_dim)` added to every s[j]
  # before the squash, at every iteration (the official code's; the paper
  # has none).
  use_bias: bool = False
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(
      self, capsules: jax.Array, activations: jax.Array | None = None
  ) -> routing.RoutingOutput:
    """`(batch, in_capsules, in_dim)` and, for 'em', activations `(batch,
    in_capsules)` -> poses `(batch, out_capsules, out_dim)`, activations
    `(batch, out_capsules)`."""
    _, in_capsules, in_dim = capsules.shape
    weights = self.param(
        'weights',
        self.weight_init,
        (in_capsules, self.out_capsules, in_dim, self.out_dim),
    )
    if self.use_bias and self.routing != 'dynamic':
      raise ValueError(f"use_bias is for 'dynamic' routing, not "
                       f'{self.routing!r}')
    parameters = {}
    if self.routing == 'dynamic':
      parameters['stop_gradient_intermediate'] = self.stop_gradient_intermediate
      if self.use_bias:
        parameters['bias'] = self.param(
            'bias', self.bias_init, (self.out_capsules, self.out_dim))
    elif self.routing == 'em':
      for name in ('beta_u', 'beta_a'):
        parameters[name] = self.param(name, nn.initializers.zeros_init(),
                                      (self.out_capsules,))
    elif self.routing == 'self_attention':
      parameters['log_priors'] = self.param(
          'log_priors', nn.initializers.zeros_init(),
          (in_capsules, self.out_capsules))
    u_hat = routing.prediction_vectors(
        capsules.astype(self.dtype), weights.astype(self.dtype)
    )
    return routing.route(self.routing, u_hat, activations,
                         num_iterations=self.routing_iterations, **parameters)


def mask_capsules(capsules: jax.Array, labels: jax.Array) -> jax.Array:
  """Zero every capsule but the labelled one and flatten.

  >>> import jax.numpy as jnp
  >>> masked = mask_capsules(jnp.ones((1, 3, 2)), jnp.array([1]))
  >>> masked.tolist()
  [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]

  Args:
    capsules: `(batch, classes, dim)`.
    labels: `(batch,)` integer class of each example.

  Returns:
    `(batch, classes * dim)`.
  """
  mask = jax.nn.one_hot(labels, capsules.shape[1], dtype=capsules.dtype)
  return (capsules * mask[:, :, None]).reshape(capsules.shape[0], -1)


class MaskedDecoder(nn.Module):
  """Reconstructs the input from one class capsule (paper, Fig. 2).

  The capsule kept is the label's in training and the longest one otherwise;
  with `labels` of shape `(batch, k)` each of the k capsules is decoded on its
  own (MultiMNIST reconstructs each digit from its own capsule).

  >>> import jax, jax.numpy as jnp
  >>> decoder = MaskedDecoder(output_shape=(4, 4, 1), hidden_sizes=(8,))
  >>> capsules = jnp.linspace(-1, 1, 2 * 10 * 16).reshape(2, 10, 16)
  >>> labels = jnp.array([3, 7])
  >>> variables = jax.jit(decoder.init)(jax.random.key(0), capsules, labels)
  >>> pixels = decoder.apply(variables, capsules, labels)
  >>> pixels.shape, bool(jnp.all((pixels > 0) & (pixels < 1)))
  ((2, 4, 4, 1), True)
  >>> # Only the labelled capsule is read: the others can be anything.
  >>> others_zeroed = capsules.at[:, :3].set(0.0)
  >>> again = decoder.apply(variables, others_zeroed, labels)
  >>> bool(jnp.allclose(again, pixels))
  True
  >>> two_digits = jnp.array([[3, 5], [7, 1]])
  >>> decoder.apply(variables, capsules, two_digits).shape
  (2, 2, 4, 4, 1)
  """

  output_shape: Sequence[int] = (28, 28, 1)
  hidden_sizes: Sequence[int] = (512, 1024)
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.Dense.kernel_init
  bias_init: Initializer = nn.Dense.bias_init

  @nn.compact
  def __call__(
      self, capsules: jax.Array, labels: jax.Array | None = None
  ) -> jax.Array:
    """capsules `(batch, classes, dim)`, labels `(batch,)`, `(batch, k)` or
    None -> reconstructions `(batch, *output_shape)` or `(batch, k, *shape)`.
    """
    batch = capsules.shape[0]
    if labels is None:
      labels = jnp.argmax(capsule_lengths(capsules), axis=-1)
    per_example = labels.ndim == 2
    if per_example:
      decoded_per_example = labels.shape[1]
      capsules = jnp.repeat(capsules, decoded_per_example, axis=0)
      labels = labels.reshape(-1)
    hidden = mask_capsules(capsules, labels)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=self.kernel_init,
                              bias_init=self.bias_init)
    for size in self.hidden_sizes:
      hidden = nn.relu(dense(size)(hidden))
    pixels = nn.sigmoid(
        dense(math.prod(self.output_shape))(hidden).astype(jnp.float32))
    if per_example:
      return pixels.reshape(batch, decoded_per_example, *self.output_shape)
    return pixels.reshape(batch, *self.output_shape)
