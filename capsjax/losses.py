"""Capsule network losses: CapsNet's margin and reconstruction losses
(Sabour, Frosst & Hinton 2017, sections 3 and 4.1) and the spread loss of
matrix capsules (Hinton, Sabour & Frosst 2018).

Each returns one value per example (no reduction), as optax losses do; the
training loss is their mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The paper's constants.
MARGIN_POSITIVE = 0.9
MARGIN_NEGATIVE = 0.1
ABSENT_CLASS_WEIGHT = 0.5
RECONSTRUCTION_WEIGHT = 0.0005
# Matrix capsules: the spread loss's margin rises from 0.2 to 0.9.
SPREAD_MARGIN_INITIAL = 0.2
SPREAD_MARGIN_FINAL = 0.9


def margin_loss(
    capsule_lengths: jax.Array,
    targets: jax.Array,
    margin_positive: float = MARGIN_POSITIVE,
    margin_negative: float = MARGIN_NEGATIVE,
    absent_class_weight: float = ABSENT_CLASS_WEIGHT,
) -> jax.Array:
  """Margin loss, eq. 4, summed over classes.

      L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

  The lengths go in as they are: no softmax over classes (a pitfall of some
  ports), since each length is its own probability.

  >>> import jax.numpy as jnp
  >>> lengths = jnp.array([[0.95, 0.05], [0.5, 0.5]])
  >>> targets = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  >>> [round(float(x), 4) for x in margin_loss(lengths, targets)]
  [0.0, 0.24]

  Args:
    capsule_lengths: |v_k|, `(batch, classes)`.
    targets: T_k, `(batch, classes)`, 1 where class k is present: one-hot for
      MNIST, two ones for MultiMNIST.
    margin_positive: m+, the length a present class must reach.
    margin_negative: m-, the length an absent class must stay under.
    absent_class_weight: lambda, down-weights the absent classes' term.

  Returns:
    `(batch,)` sum over classes of L_k.
  """
  targets = targets.astype(capsule_lengths.dtype)
  present = targets * jnp.square(jax.nn.relu(margin_positive - capsule_lengths))
  absent = (
      absent_class_weight
      * (1.0 - targets)
      * jnp.square(jax.nn.relu(capsule_lengths - margin_negative))
  )
  return jnp.sum(present + absent, axis=-1)


def reconstruction_loss(
    reconstructions: jax.Array,
    images: jax.Array,
    weight: float = RECONSTRUCTION_WEIGHT,
) -> jax.Array:
  """Weighted sum of squared pixel differences per example (section 4.1).

      L_rec = weight * sum_pixels (reconstruction - image)^2

  >>> import jax.numpy as jnp
  >>> float(reconstruction_loss(jnp.ones((1, 28, 28, 1)),
  ...                           jnp.zeros((1, 28, 28, 1)), weight=1.0)[0])
  784.0

  Args:
    reconstructions: `(batch, ...)` decoder output, pixels in [0, 1].
    images: `(batch, ...)` targets of the same shape, pixels in [0, 1].
    weight: 0.0005 in the paper, so the margin loss dominates.

  Returns:
    `(batch,)` weighted sums.
  """
  if reconstructions.shape != images.shape:
    raise ValueError(
        f'reconstructions {reconstructions.shape} and images {images.shape} '
        'must have the same shape'
    )
  squared_error = jnp.square(
      reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
  )
  return weight * jnp.sum(squared_error.reshape(images.shape[0], -1), axis=-1)


def spread_loss(
    activations: jax.Array,
    targets: jax.Array,
    margin: float | jax.Array = SPREAD_MARGIN_FINAL,
) -> jax.Array:
  """Spread loss of matrix capsules (Hinton, Sabour & Frosst 2018).

      L = sum_{i != t} max(0, m - (a_t - a_i))^2

  Each wrong class i is penalised unless the target's activation a_t leads
  its own by at least the margin m; L is zero exactly when a_t - a_i >= m
  for every i != t.

  >>> import jax.numpy as jnp
  >>> activations = jnp.array([[0.95, 0.05, 0.0], [0.5, 0.6, 0.1]])
  >>> [round(float(x), 4) for x in spread_loss(activations, jnp.array([0, 0]),
  ...                                          margin=0.2)]
  [0.0, 0.09]

  Args:
    activations: a_i, `(batch, classes)`, the class capsules' activations.
    targets: the class t of each example: integer labels `(batch,)`, or
      one-hot `(batch, classes)`.
    margin: m, in [0, 1]; raised during training (`spread_loss_margin`).

  Returns:
    `(batch,)` the sum over the wrong classes.
  """
  if targets.ndim == activations.ndim - 1:
    targets = jax.nn.one_hot(targets, activations.shape[-1],
                             dtype=activations.dtype)
  if targets.shape != activations.shape:
    raise ValueError(
        f'targets {targets.shape} must be labels {activations.shape[:-1]} or '
        f'one-hot {activations.shape}')
  targets = targets.astype(activations.dtype)
  target_activations = jnp.sum(targets * activations, axis=-1, keepdims=True)
  shortfall = jax.nn.relu(margin - (target_activations - activations))
  return jnp.sum((1.0 - targets) * jnp.square(shortfall), axis=-1)


def spread_loss_margin(
    step: int | jax.Array,
    ramp_steps: int,
    initial: float = SPREAD_MARGIN_INITIAL,
    final: float = SPREAD_MARGIN_FINAL,
) -> jax.Array:
  """The spread loss's margin at a training step: linear from 0.2 to 0.9.

      m(step) = initial + (final - initial) min(1, max(0, step) / ramp_steps)

  The paper starts "with a small margin of 0.2" and increases it "linearly
  during training to 0.9", which avoids dead capsules in the early layers;
  it does not say over how many steps. An optax-style schedule: `step` may
  be traced.

  >>> [round(float(spread_loss_margin(step, ramp_steps=10)), 4)
  ...  for step in (0, 5, 10, 20)]
  [0.2, 0.55, 0.9, 0.9]

  Args:
    step: the training step, from 0.
    ramp_steps: the steps over which the margin rises, >= 1; it stays at
      `final` afterwards.
    initial: the margin at step 0.
    final: the margin from `ramp_steps` on.

  Returns:
    The margin, a float32 scalar.
  """
  if ramp_steps < 1:
    raise ValueError(f'ramp_steps must be >= 1, got {ramp_steps}')
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  return initial + (final - initial) * progress
