"""Routing between capsule layers: dynamic, EM, self-attention and none.

Every algorithm turns votes (prediction vectors, `(batch, in_capsules,
out_capsules, *pose)`) and optional input activations into output poses and
activations, through one interface:

    u_hat = prediction_vectors(u, weights)             # (batch, in, out, dim)
    out = route('dynamic', u_hat, num_iterations=3)    # a RoutingOutput
    out.poses, out.activations                         # (batch, out, dim), (batch, out)

| algorithm | paper | votes | input activations | learned arrays |
| --- | --- | --- | --- | --- |
| 'dynamic' | Sabour et al. 2017, Procedure 1 | vectors | none (lengths) | - |
| 'em' | Hinton et al. 2018, Procedure 1 | flattened poses | required | beta_u, beta_a |
| 'self_attention' | Mazzia et al. 2021 | vectors | none (lengths) | log_priors |
| 'none' | uniform coupling (ablation) | vectors | optional weights | - |

Each example is routed on its own (the procedures are vmapped over the
batch), so an output never depends on the other examples in the batch. All
routing runs in float32 or wider: bfloat16 votes are routed in float32,
float64 votes (under `jax_enable_x64`) stay float64.

Procedure 1 of dynamic routing, for one example, as written in the paper:

    1: procedure ROUTING(u_hat[j|i], r, l)
    2:   for all capsule i in layer l and j in layer (l+1): b[i,j] <- 0
    3:   for r iterations do
    4:     for all capsule i in layer l: c[i] <- softmax(b[i])   (over parents j)
    5:     for all capsule j in layer (l+1): s[j] <- sum_i c[i,j] u_hat[j|i]
    6:     for all capsule j in layer (l+1): v[j] <- squash(s[j])
    7:     for all i in l and j in (l+1): b[i,j] <- b[i,j] + u_hat[j|i] . v[j]
    8:   return v[j]

(The official code adds a learned bias to s[j] in line 5; `dynamic_routing`
takes one as `bias`, None by default as in the paper.)

Procedure 1 of EM routing (matrix capsules), for one example:

    1: procedure EM ROUTING(a, V)
    2:   R_ij <- 1 / |Omega_{L+1}|
    3:   for t iterations do
    4:     M-STEP(a, R, V) for every parent j
    5:     E-STEP(mu, sigma, a, V) for every child i
    6:   return a, M
       M-STEP: R_ij <- R_ij a_i
               mu_j^h = sum_i R_ij V_ij^h / sum_i R_ij
               (sigma_j^h)^2 = sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij
               cost^h = (beta_u + log sigma_j^h) sum_i R_ij
               a_j = logistic(lambda (beta_a - sum_h cost^h))
       E-STEP: p_j = N(V_ij; mu_j, sigma_j^2)   (diagonal Gaussian density)
               R_ij = a_j p_j / sum_k a_k p_k
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp

from capsjax.nonlinearity import capsule_lengths, safe_norm, squash

ALGORITHMS = ('dynamic', 'em', 'self_attention', 'none')

# Added to the variance and to sum_i R_ij in EM routing: the paper has none,
# but a parent whose votes all agree (or that receives nothing, e.g. on a
# blank input) would otherwise have sigma^2 = 0 and log sigma = -inf.
EM_EPSILON = 1e-8


class RoutingOutput(NamedTuple):
  """What every routing algorithm returns; a pytree.

  poses: `(batch, out_capsules, *pose)`, the output capsules (v for vector
    capsules, the pose means mu for EM).
  activations: `(batch, out_capsules)`, the probability that each output
    entity is present: |v| for vector capsules, a_j for EM.
  coupling: `(batch, in_capsules, out_capsules)` coupling or assignment
    coefficients, summing to one over the outputs, or None unless asked for.
  """

  poses: jax.Array
  activations: jax.Array
  coupling: jax.Array | None


def _routing_dtype(dtype: Any) -> Any:
  """float32 or wider: softmaxes and norms lose too much in bfloat16."""
  return jnp.promote_types(dtype, jnp.float32)


# ---------------------------------------------------------------------------
# Prediction vectors (votes).


def prediction_vectors(inputs: jax.Array, weights: jax.Array) -> jax.Array:
  """Prediction vectors u_hat[j|i] = W[i,j] u[i] (paper, eq. 2), no bias.

  Every pair of an input capsule i and a parent capsule j has its own
  transformation matrix.

  >>> import jax.numpy as jnp
  >>> u = jnp.ones((2, 1152, 8))
  >>> W = jnp.ones((1152, 10, 8, 16))
  >>> prediction_vectors(u, W).shape
  (2, 1152, 10, 16)

  Args:
    inputs: input capsules u, `(batch, in_capsules, in_dim)`.
    weights: W, `(in_capsules, out_capsules, in_dim, out_dim)`.

  Returns:
    u_hat, `(batch, in_capsules, out_capsules, out_dim)`, in the promoted
    dtype of the two; gradients come back in each argument's own dtype.

  Differentiable in forward and reverse mode to any order and vmappable; the
  reverse pass reads the cotangent in one layout for both products (see
  `_transform_inputs_cotangent`).
  """
  if inputs.ndim != 3 or weights.ndim != 4:
    raise ValueError(
        'prediction_vectors expects inputs (batch, in_capsules, in_dim) and '
        'weights (in_capsules, out_capsules, in_dim, out_dim); got shapes '
        f'{inputs.shape} and {weights.shape}'
    )
  if inputs.shape[1] != weights.shape[0] or inputs.shape[2] != weights.shape[2]:
    raise ValueError(
        f'inputs {inputs.shape} do not match weights {weights.shape}: need '
        'inputs.shape[1:] == (weights.shape[0], weights.shape[2])'
    )
  # Promoting outside the primitive: the conversions' own transposes give
  # each cotangent its primal's dtype.
  dtype = jnp.promote_types(inputs.dtype, weights.dtype)
  return _transform_p.bind(inputs.astype(dtype), weights.astype(dtype))


# u_hat is bilinear in (u, W), so it is a primitive with `ad.defbilinear`:
# its tangent is the same product of a tangent and a primal (linear, so
# forward mode works to any order), and JAX transposes that tangent with the
# two cotangent rules below for reverse mode. A custom_vjp has no forward
# mode; `linear_call` has no JVP in its residuals (second order over reverse
# mode) and no batching rule.
_transform_p = Primitive('capsule_prediction_vectors')


def _transform(inputs: jax.Array, weights: jax.Array) -> jax.Array:
  """u_hat[b,i,j,:] = sum_k u[b,i,k] W[i,j,k,:], one multiply-add per k,
  in float32 or wider (returned in the inputs' dtype).

  Not an einsum: a product contracting in_dim = 8 runs far below the
  machine's dot rate, and its output comes out in the product's layout,
  which the routing (parent-major) then copies. Elementwise, XLA writes
  u_hat in the order its reader wants. Measured at the MNIST shape, batch
  128, whole training step and evaluation compiled both ways in one
  process, alternating (8 rounds): float32 548 against 589 ms a step, 164
  against 175 ms an evaluated batch, step temporaries 469 against 524 MB;
  bfloat16 480 against 501 ms and 146 against 159 ms.
  """
  dtype = inputs.dtype
  compute_dtype = _routing_dtype(dtype)
  inputs = inputs.astype(compute_dtype)
  weights = weights.astype(compute_dtype)
  u_hat = inputs[:, :, None, 0, None] * weights[None, :, :, 0, :]
  for k in range(1, inputs.shape[2]):
    u_hat = u_hat + inputs[:, :, None, k, None] * weights[None, :, :, k, :]
  return u_hat.astype(dtype)


def _transform_abstract_eval(inputs, weights):
  return jax.core.ShapedArray(
      (inputs.shape[0], inputs.shape[1], weights.shape[1], weights.shape[3]),
      inputs.dtype)


def _transform_inputs_cotangent(u_hat_cotangent, inputs, weights):
  """d inputs: the cotangent read as `(in_capsules, batch, out * dim)`.

  In autodiff's orientation the two products want the cotangent in two
  different layouts, and XLA:CPU then computes the whole routing backward
  pass twice, once writing batch-minor. Measured at the MNIST shape, batch
  128, prediction vectors + routing (r=3) forward + backward: 457 ms that
  way, 171 ms this way (both cotangent rules read the same layout).
  """
  del inputs
  # (in, batch, in_dim).
  inputs_cotangent = jax.lax.dot_general(
      u_hat_cotangent, weights, (((2, 3), (1, 3)), ((1,), (0,))))
  return jnp.transpose(inputs_cotangent, (1, 0, 2))


def _transform_weights_cotangent(u_hat_cotangent, inputs, weights):
  """d weights, reading the cotangent in the same layout as d inputs."""
  del weights
  # (in, in_dim, out, dim).
  weights_cotangent = jax.lax.dot_general(
      inputs, u_hat_cotangent, (((0,), (0,)), ((1,), (1,))))
  return jnp.transpose(weights_cotangent, (0, 2, 1, 3))


def _transform_batch(arguments, batch_axes):
  """vmap: a mapped axis of the inputs only joins their batch axis."""
  inputs, weights = arguments
  inputs_axis, weights_axis = batch_axes
  if weights_axis is None:
    inputs = jnp.moveaxis(inputs, inputs_axis, 0)
    mapped, batch = inputs.shape[:2]
    u_hat = _transform_p.bind(
        inputs.reshape(mapped * batch, *inputs.shape[2:]), weights)
    return u_hat.reshape(mapped, batch, *u_hat.shape[1:]), 0
  return jax.vmap(_transform, (inputs_axis, weights_axis))(inputs, weights), 0


_transform_p.def_impl(_transform)
_transform_p.def_abstract_eval(_transform_abstract_eval)
mlir.register_lowering(
    _transform_p, mlir.lower_fun(_transform, multiple_results=False))
ad.defbilinear(_transform_p, _transform_inputs_cotangent,
               _transform_weights_cotangent)
batching.primitive_batchers[_transform_p] = _transform_batch


# ---------------------------------------------------------------------------
# Dynamic routing (Sabour, Frosst & Hinton 2017).


def _agreement_update(
    logits: jax.Array, u_hat: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lines 4-7 of Procedure 1 for one example; returns (b', c, v).

  Parent-major: logits b and coupling c are `(out, in)`, u_hat `(out, in,
  dim)`.
  """
  coupling = jax.nn.softmax(logits, axis=0)  # 4: over parents j
  weighted_sum = jnp.einsum('ji,jid->jd', coupling, u_hat)  # 5: s[j]
  if bias is not None:  # The official code's, not the paper's.
    weighted_sum = weighted_sum + bias
  parents = squash(weighted_sum)  # 6: v[j]
  agreement = jnp.einsum('jid,jd->ji', u_hat, parents)  # 7: u_hat[j|i] . v[j]
  return logits + agreement, coupling, parents


def _route_one_example(
    u_hat: jax.Array, num_iterations: int, stop_gradient_intermediate: bool,
    bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Procedure 1 for one example: u_hat `(in, out, dim)` -> (v, c).

  The first `num_iterations - 1` iterations only refine the logits b and run
  in a `lax.fori_loop`; the last one produces v, so its line-7 update (which
  nothing would read) is never needed for the output.
  """
  # Routed parent-major, `(out, in, dim)`: lines 5 and 7 then contract
  # contiguous `(in, dim)` slices of one parent, where the `(in, out, dim)`
  # layout makes XLA:CPU copy u_hat into that order for each of them.
  # Measured at the MNIST shape, batch 128, prediction vectors + routing
  # (r=3), medians of 7 alternating rounds: forward 70 against 113 ms,
  # forward + backward 152 against 185 ms.
  u_hat = jnp.transpose(u_hat, (1, 0, 2)).astype(_routing_dtype(u_hat.dtype))
  out_capsules, in_capsules, _ = u_hat.shape
  routed_u_hat = (
      jax.lax.stop_gradient(u_hat) if stop_gradient_intermediate else u_hat
  )
  logits = jnp.zeros((out_capsules, in_capsules), u_hat.dtype)  # 2: b <- 0
  # Without the barrier XLA:CPU constant-folds the first softmax of this
  # (batch, out, in) constant, which costs seconds of compile time.
  logits = jax.lax.optimization_barrier(logits)

  def iteration(_, logits):  # 3: repeat r - 1 times ...
    new_logits, _, _ = _agreement_update(logits, routed_u_hat, bias)
    return new_logits

  # Unrolled (the count is static and small): XLA then fuses across
  # iterations and the backward pass keeps no stacked loop residuals.
  # Measured at the MNIST shape, batch 128, forward + backward: 165 ms
  # against 407 ms rolled at r=3, 291 against 696 ms at r=5. Known issue:
  # with jax 0.10.2, from r = 3 (two trips) the second derivatives through
  # this loop differ from those of the same loop written in Python (0.26
  # largest difference in a small Hessian; check_grads order 2 fails; r <= 2
  # passes, first derivatives always agree). The Python loop needs 28% more
  # temporary memory for the MNIST forward + backward, so it is not used.
  logits = jax.lax.fori_loop(0, num_iterations - 1, iteration, logits,
                             unroll=True)
  # ... and the r-th time, lines 4-6 with the gradient always flowing.
  _, coupling, parents = _agreement_update(logits, u_hat, bias)
  return parents, coupling.T  # 8: return v (and c as (in, out))


def _check_num_iterations(num_iterations: int) -> None:
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
    raise TypeError(
        f'num_iterations must be a Python int, got {num_iterations!r}'
    )
  if num_iterations < 1:
    raise ValueError(f'num_iterations must be >= 1, got {num_iterations}')


def _check_votes(votes: jax.Array, min_ndim: int = 4) -> None:
  if votes.ndim < min_ndim:
    raise ValueError(
        'votes must be (batch, in_capsules, out_capsules, *pose), got shape '
        f'{votes.shape}'
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        'num_iterations',
        'return_coupling',
        'stop_gradient_intermediate',
    ),
)
def dynamic_routing(
    u_hat: jax.Array,
    num_iterations: int = 3,
    *,
    return_coupling: bool = False,
    stop_gradient_intermediate: bool = False,
    bias: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Routing by agreement between two capsule layers (Procedure 1).

  Each example is routed on its own (the procedure is vmapped over the
  batch): its routing logits b start at zero and are never shared, so the
  output for an example does not depend on the batch it is in.
  `route('dynamic', ...)` returns the same v in a `RoutingOutput`.

  >>> import jax, jax.numpy as jnp
  >>> u_hat = jax.random.normal(jax.random.key(0), (2, 32, 10, 16))
  >>> v, c = dynamic_routing(u_hat, num_iterations=3, return_coupling=True)
  >>> v.shape, c.shape
  ((2, 10, 16), (2, 32, 10))
  >>> bool(jnp.allclose(c.sum(-1), 1.0, atol=1e-6))
  True

  Args:
    u_hat: prediction vectors u_hat[j|i], `(batch, in_capsules,
      out_capsules, dim)`, e.g. from `prediction_vectors`.
    num_iterations: r >= 1, the number of routing iterations (the paper uses
      3). With r = 1 the coupling is uniform, c[i,j] = 1 / out_capsules.
    return_coupling: also return the coupling coefficients c of the last
      iteration.
    stop_gradient_intermediate: if True, the gradient flows into u_hat only
      through the last iteration (as in several public ports); the earlier
      iterations treat u_hat as a constant, so the backward pass stores
      nothing per iteration. If False (the paper's Procedure 1 and the
      official code), it flows through every iteration.
    bias: optional `(out_capsules, dim)`, added to every s[j] in line 5 of
      every iteration, before the squash: the official code's class capsule
      layer has one (initialised to 0.1); the paper's has none (None).

  Returns:
    v, `(batch, out_capsules, dim)`, in float32 (float64 for float64
    u_hat); with `return_coupling` also c, `(batch, in_capsules,
    out_capsules)`, which sums to 1 over the parents.
  """
  _check_num_iterations(num_iterations)
  if u_hat.ndim != 4:
    raise ValueError(
        'u_hat must be (batch, in_capsules, out_capsules, dim), got shape '
        f'{u_hat.shape}'
    )
  if bias is not None:
    expected = (u_hat.shape[2], u_hat.shape[3])
    if bias.shape != expected:
      raise ValueError(f'bias must be (out_capsules, dim) = {expected}, got '
                       f'shape {bias.shape}')
    bias = bias.astype(_routing_dtype(u_hat.dtype))
  # One bias for every example: bound here, not mapped over the batch.
  route_example = functools.partial(
      _route_one_example,
      num_iterations=num_iterations,
      stop_gradient_intermediate=stop_gradient_intermediate,
      bias=bias,
  )
  parents, coupling = jax.vmap(route_example)(u_hat)
  if return_coupling:
    return parents, coupling
  return parents


# ---------------------------------------------------------------------------
# No routing: uniform coupling, the ablation baseline.


@functools.partial(jax.jit, static_argnames=('return_coupling',))
def no_routing(
    votes: jax.Array,
    activations: jax.Array | None = None,
    *,
    return_coupling: bool = False,
) -> RoutingOutput:
  """Every input sends the same share of its vote to every parent.

      c[i,j] = 1 / out_capsules,   s[j] = sum_i c[i,j] a_i u_hat[j|i],
      v[j] = squash(s[j])

  Without input activations (a_i = 1) this is dynamic routing with one
  iteration.

  >>> import jax, jax.numpy as jnp
  >>> votes = jax.random.normal(jax.random.key(0), (2, 32, 10, 16))
  >>> out = no_routing(votes, return_coupling=True)
  >>> bool(jnp.allclose(out.coupling, 1 / 10))
  True
  >>> one_iteration = dynamic_routing(votes, num_iterations=1)
  >>> bool(jnp.allclose(out.poses, one_iteration, atol=1e-6))
  True

  Args:
    votes: u_hat, `(batch, in_capsules, out_capsules, dim)`.
    activations: optional a_i, `(batch, in_capsules)`, weighting each input's
      vote.
    return_coupling: also return the uniform c.

  Returns:
    A `RoutingOutput`: v `(batch, out, dim)`, |v| `(batch, out)`.
  """
  _check_votes(votes)
  batch, in_capsules, out_capsules, _ = votes.shape
  dtype = _routing_dtype(votes.dtype)
  coupling = jnp.full((batch, in_capsules, out_capsules), 1.0 / out_capsules,
                      dtype)
  weights = coupling
  if activations is not None:
    weights = coupling * activations.astype(dtype)[:, :, None]
  parents = squash(jnp.einsum('bij,bijd->bjd', weights, votes.astype(dtype)))
  return RoutingOutput(parents, capsule_lengths(parents),
                       coupling if return_coupling else None)


# ---------------------------------------------------------------------------
# Self-attention routing (Mazzia, Salvetti & Chiaberge 2021,
# Efficient-CapsNet).


def exponential_squash(vectors: jax.Array, axis: int = -1) -> jax.Array:
  """Efficient-CapsNet's squash: v = (1 - e^(-|s|)) s / |s|.

  Lengths are in [0, 1) and grow faster for short vectors than eq. 1's
  squash. |s| is `safe_norm`, so value and gradient are finite at s = 0.

  Args:
    vectors: `(..., dim)` capsule inputs s.
    axis: the axis holding the vector components.

  Returns:
    v, same shape and dtype as `vectors`.
  """
  norm = safe_norm(vectors, axis=axis, keepdims=True)
  return -jnp.expm1(-norm) / norm * vectors


def _self_attention_one_example(
    votes: jax.Array, log_priors: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
  """Self-attention routing for one example: votes `(in, out, dim)`."""
  # Row sums of A_j = U_j U_j^T / sqrt(d): sum_k u_hat[j|i] . u_hat[j|k],
  # computed as u_hat[j|i] . (sum_k u_hat[j|k]) without forming A_j.
  votes_sum = jnp.sum(votes, axis=0)  # (out, dim)
  logits = jnp.einsum('ijd,jd->ij', votes, votes_sum) / temperature
  coupling = jax.nn.softmax(logits, axis=-1)  # C: over the outputs j
  # s_j = sum_i u_hat[j|i] (C_ij + B_ij), the log prior added after the
  # softmax (as the official code).
  weighted_sum = jnp.einsum('ij,ijd->jd', coupling + log_priors, votes)
  return exponential_squash(weighted_sum), coupling


@functools.partial(jax.jit, static_argnames=('return_coupling',))
def self_attention_routing(
    votes: jax.Array,
    log_priors: jax.Array | None = None,
    *,
    temperature: float | None = None,
    return_coupling: bool = False,
) -> RoutingOutput:
  """Efficient-CapsNet's non-iterative routing by self-attention.

  For each output j, A_j = U_j U_j^T / sqrt(d) over the input capsules'
  votes; its row sums are the logits, the coupling is a softmax over the
  outputs for each input, the learned log priors B are added after it, and
  s_j = sum_i u_hat[j|i] (C_ij + B_ij) is squashed by `exponential_squash`.

  >>> import jax, jax.numpy as jnp
  >>> votes = jax.random.normal(jax.random.key(0), (2, 32, 10, 16))
  >>> out = self_attention_routing(votes, return_coupling=True)
  >>> out.poses.shape, out.coupling.shape
  ((2, 10, 16), (2, 32, 10))
  >>> bool(jnp.allclose(out.coupling.sum(-1), 1.0, atol=1e-6))
  True
  >>> bool(jnp.all(out.activations <= 1))
  True

  Args:
    votes: u_hat, `(batch, in_capsules, out_capsules, dim)`.
    log_priors: B, `(in_capsules, out_capsules)`; None: zeros.
    temperature: the logits' divisor; None: sqrt(dim), the paper's.
    return_coupling: also return C (without B).

  Returns:
    A `RoutingOutput`: v `(batch, out, dim)`, |v| `(batch, out)`.
  """
  _check_votes(votes)
  if votes.ndim != 4:
    raise ValueError(f'votes must be (batch, in, out, dim), got {votes.shape}')
  dtype = _routing_dtype(votes.dtype)
  votes = votes.astype(dtype)
  if log_priors is None:
    log_priors = jnp.zeros(votes.shape[1:3], dtype)
  if temperature is None:
    temperature = math.sqrt(votes.shape[-1])
  parents, coupling = jax.vmap(
      _self_attention_one_example, in_axes=(0, None, None))(
          votes, log_priors.astype(dtype), temperature)
  return RoutingOutput(parents, capsule_lengths(parents),
                       coupling if return_coupling else None)


# ---------------------------------------------------------------------------
# EM routing (Hinton, Sabour & Frosst 2018, matrix capsules).


def inverse_temperature_schedule(
    num_iterations: int, final: float = 1.0, rate: float = 0.95
) -> jax.Array:
  """lambda_t = final (1 - rate^(t+1)) / (1 - rate^T), t = 0 .. T-1.

  The paper fixes a schedule without numbers; its authors' public answer is
  lambda_t = 0.01 (1 - 0.95^(t+1)) with the cost as written. This keeps that
  rising shape and ends at `final`, which suits the normalised cost of
  `em_routing` (an O(1) logistic input); `final=0.01 * (1 - 0.95**T)` gives
  the authors' values.

  Returns:
    `(num_iterations,)` float32.
  """
  _check_num_iterations(num_iterations)
  steps = jnp.arange(1, num_iterations + 1, dtype=jnp.float32)
  return final * (1.0 - rate**steps) / (1.0 - rate**num_iterations)


def _m_step(assignment, activations, votes, beta_u, beta_a,
            inverse_temperature, normalize_cost, epsilon):
  """M-step for one example: -> (mu, sigma^2, a_j logits)."""
  in_capsules, out_capsules, pose_size = votes.shape
  assignment = assignment * activations[:, None]  # R_ij <- R_ij a_i
  assigned = jnp.sum(assignment, axis=0)  # sum_i R_ij, (out,)
  denominator = assigned[:, None] + epsilon
  mean = jnp.einsum('ij,ijh->jh', assignment, votes) / denominator  # mu_j^h
  variance = jnp.einsum(  # (sigma_j^h)^2
      'ij,ijh->jh', assignment, jnp.square(votes - mean)) / denominator
  variance = variance + epsilon
  log_sigma = 0.5 * jnp.log(variance)
  if normalize_cost:
    # log sigma relative to its mean over the parents: log sigma follows the
    # votes' absolute scale (small votes, as a fresh network makes, give a
    # very negative cost that saturates every a_j at 1, where the logistic
    # passes almost no gradient); the difference keeps only how well each
    # parent's votes agree against the others', whatever the scale.
    log_sigma = log_sigma - jnp.mean(log_sigma, axis=0)
  # cost^h = (beta_u + log sigma_j^h) sum_i R_ij
  cost = (beta_u + log_sigma) * assigned[:, None]
  if normalize_cost:
    # A mean over the pose dimensions, and sum_i R_ij relative to an even
    # split of the inputs: the logistic's input then does not grow with the
    # pose size or the number of inputs, which saturates it otherwise.
    cost = cost * (out_capsules / in_capsules) / pose_size
  cost = jnp.sum(cost, axis=-1)  # sum_h cost^h, (out,)
  # a_j = logistic(lambda (beta_a - sum_h cost^h)); kept as the logit.
  logits = inverse_temperature * (beta_a - cost)
  return mean, variance, logits


def _e_step(mean, variance, activation_logits, votes):
  """E-step for one example: -> R `(in, out)`, in log space (no overflow)."""
  # log p_j = -sum_h [(V_ij^h - mu_j^h)^2 / (2 sigma^2) + log(2 pi sigma^2)/2]
  log_density = -0.5 * jnp.sum(
      jnp.square(votes - mean) / variance + jnp.log(2 * jnp.pi * variance),
      axis=-1)
  # R_ij = a_j p_j / sum_k a_k p_k
  return jax.nn.softmax(jax.nn.log_sigmoid(activation_logits) + log_density,
                        axis=-1)


def _em_one_example(votes, activations, beta_u, beta_a, inverse_temperatures,
                    num_iterations, normalize_cost, epsilon):
  """Procedure 1 for one example: votes `(in, out, h)` -> (M, a, R)."""
  in_capsules, out_capsules, _ = votes.shape
  assignment = jnp.full((in_capsules, out_capsules), 1.0 / out_capsules,
                        votes.dtype)  # 2: R_ij <- 1 / |Omega_{L+1}|
  for iteration in range(num_iterations):  # 3: static and small: unrolled
    mean, variance, logits = _m_step(  # 4
        assignment, activations, votes, beta_u, beta_a,
        inverse_temperatures[iteration], normalize_cost, epsilon)
    if iteration < num_iterations - 1:  # the last E-step is never read
      assignment = _e_step(mean, variance, logits, votes)  # 5
  return mean, jax.nn.sigmoid(logits), assignment  # 6: return a, M


@functools.partial(
    jax.jit,
    static_argnames=('num_iterations', 'normalize_cost', 'return_coupling'))
def em_routing(
    votes: jax.Array,
    activations: jax.Array,
    beta_u: jax.Array,
    beta_a: jax.Array,
    *,
    num_iterations: int = 3,
    inverse_temperatures: jax.Array | Sequence[float] | None = None,
    normalize_cost: bool = True,
    epsilon: float = EM_EPSILON,
    return_coupling: bool = False,
) -> RoutingOutput:
  """EM routing between matrix capsule layers (Procedure 1, 2018).

  >>> import jax, jax.numpy as jnp
  >>> vote_key, activation_key = jax.random.split(jax.random.key(0))
  >>> votes = jax.random.normal(vote_key, (2, 32, 10, 4, 4))  # 4x4 poses
  >>> activations = jax.random.uniform(activation_key, (2, 32))
  >>> out = em_routing(votes, activations, jnp.zeros(10), jnp.zeros(10),
  ...                  return_coupling=True)
  >>> out.poses.shape, out.activations.shape
  ((2, 10, 4, 4), (2, 10))
  >>> bool(jnp.all((out.activations > 0) & (out.activations < 1)))
  True
  >>> bool(jnp.allclose(out.coupling.sum(-1), 1.0, atol=1e-5))
  True

  Args:
    votes: V_ij = M_i W_ij, `(batch, in_capsules, out_capsules, *pose)`
      (e.g. 4x4 matrices); the pose is flattened into h components.
    activations: a_i, `(batch, in_capsules)`, in [0, 1].
    beta_u: `(out_capsules,)` (once per output type, as most ports and
      eq. 2) or `(out_capsules, h)` (per pose component, Procedure 1 line 5).
    beta_a: `(out_capsules,)`.
    num_iterations: t >= 1 (the paper uses 3).
    inverse_temperatures: lambda for each iteration, `(num_iterations,)`;
      None: `inverse_temperature_schedule(num_iterations)`.
    normalize_cost: True: the cost is averaged over the pose components,
      sum_i R_ij taken relative to an even split of the inputs (out / in),
      and log sigma_j^h taken relative to its mean over the output capsules,
      so the logistic saturates neither as the layer grows nor with the
      votes' scale; False: the paper's cost as written.
    epsilon: added to sigma^2 and to sum_i R_ij (see `EM_EPSILON`).
    return_coupling: also return the assignment R of the last M-step.

  Returns:
    A `RoutingOutput`: mu `(batch, out, *pose)`, a_j `(batch, out)` in
    (0, 1), and R `(batch, in, out)` (before the multiplication by a_i, so
    it sums to one over the outputs).
  """
  _check_num_iterations(num_iterations)
  _check_votes(votes)
  batch, in_capsules, out_capsules, *pose = votes.shape
  if activations.shape != (batch, in_capsules):
    raise ValueError(f'activations {activations.shape} must be (batch, '
                     f'in_capsules) = {(batch, in_capsules)}')
  dtype = _routing_dtype(jnp.result_type(votes, activations, beta_u, beta_a))
  if inverse_temperatures is None:
    inverse_temperatures = inverse_temperature_schedule(num_iterations)
  inverse_temperatures = jnp.asarray(inverse_temperatures, dtype)
  if inverse_temperatures.shape != (num_iterations,):
    raise ValueError(f'inverse_temperatures {inverse_temperatures.shape} '
                     f'must be (num_iterations,) = ({num_iterations},)')
  route_example = functools.partial(
      _em_one_example, num_iterations=num_iterations,
      normalize_cost=normalize_cost, epsilon=epsilon)
  means, out_activations, assignment = jax.vmap(
      route_example, in_axes=(0, 0, None, None, None))(
          votes.reshape(batch, in_capsules, out_capsules, -1).astype(dtype),
          activations.astype(dtype),
          beta_u.astype(dtype).reshape(out_capsules, -1),
          beta_a.astype(dtype), inverse_temperatures)
  return RoutingOutput(means.reshape(batch, out_capsules, *pose),
                       out_activations,
                       assignment if return_coupling else None)


# ---------------------------------------------------------------------------
# The one interface.


def route(
    algorithm: str,
    votes: jax.Array,
    activations: jax.Array | None = None,
    *,
    num_iterations: int = 3,
    return_coupling: bool = False,
    **parameters: Any,
) -> RoutingOutput:
  """Routes `votes` with the named algorithm.

  >>> import jax, jax.numpy as jnp
  >>> votes = jax.random.normal(jax.random.key(0), (2, 32, 10, 16))
  >>> out = route('self_attention', votes)
  >>> out.poses.shape, out.activations.shape
  ((2, 10, 16), (2, 10))
  >>> bool(jnp.all((out.activations >= 0) & (out.activations <= 1)))
  True

  Args:
    algorithm: one of `ALGORITHMS`: 'dynamic', 'em', 'self_attention',
      'none'.
    votes: `(batch, in_capsules, out_capsules, *pose)`: vectors `(dim,)` for
      'dynamic', 'self_attention' and 'none', any pose (e.g. 4x4) for 'em'.
    activations: a_i `(batch, in_capsules)`: required by 'em', optional
      weights for 'none', rejected by 'dynamic' and 'self_attention' (their
      inputs' presence is the votes' length).
    num_iterations: for the iterative algorithms ('dynamic', 'em'); the
      others are non-iterative and ignore it.
    return_coupling: also return the coupling / assignment coefficients.
    **parameters: the algorithm's own arguments: 'dynamic':
      `stop_gradient_intermediate`, `bias`; 'em': `beta_u`, `beta_a` (required),
      `inverse_temperatures`, `normalize_cost`, `epsilon`; 'self_attention':
      `log_priors`, `temperature`.

  Returns:
    A `RoutingOutput`.
  """
  if algorithm == 'em':
    if activations is None:
      raise ValueError("'em' routing needs the input activations")
    return em_routing(votes, activations, num_iterations=num_iterations,
                      return_coupling=return_coupling, **parameters)
  if algorithm == 'none':
    return no_routing(votes, activations, return_coupling=return_coupling,
                      **parameters)
  if algorithm not in ALGORITHMS:
    raise ValueError(f'unknown routing algorithm {algorithm!r}; one of '
                     f'{ALGORITHMS}')
  if activations is not None:
    raise ValueError(f'{algorithm!r} routing reads presence from the votes\' '
                     'lengths; it takes no activations')
  if algorithm == 'self_attention':
    return self_attention_routing(votes, return_coupling=return_coupling,
                                  **parameters)
  parents, coupling = dynamic_routing(votes, num_iterations,
                                      return_coupling=True, **parameters)
  return RoutingOutput(parents, capsule_lengths(parents),
                       coupling if return_coupling else None)
