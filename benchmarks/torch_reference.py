"""PyTorch reference CapsNet (Sabour, Frosst & Hinton 2017), timing baseline.

A plain, idiomatic PyTorch port of the paper's MNIST CapsNet, written the way a
typical public port is, used as the baseline that capsjax is timed against.
It is NOT part of the capsjax package and needs only ``torch`` and ``numpy``.

Network (see shared REFERENCE.md):
  Conv1        nn.Conv2d(1, 256, 9, stride 1) + ReLU          -> 256 x 20 x 20
  PrimaryCaps  nn.Conv2d(256, 256, 9, stride 2)               -> 256 x 6 x 6
               32 types of 8D capsules, grouped by channel    -> 1152 x 8
               then squash
  DigitCaps    W (1152, 10, 16, 8), no bias, 3 routing iterations with
               per-example logits b (B, 1152, 10), softmax over the 10 parents
  Decoder      DigitCaps masked by the label, FC 512 ReLU, FC 1024 ReLU,
               FC 784 sigmoid
  Loss         margin loss (m+ 0.9, m- 0.1, lambda 0.5) summed over classes,
               mean over batch + 0.0005 * sum of squared pixel errors, mean
               over batch
  Optimizer    Adam, lr 1e-3

Parameter count: 8,215,568 (asserted).

Usage as a script::

    python benchmarks/torch_reference.py --batch-size 128 --steps 10 \
        --warmup 2 --precision both --threads 2 --out torch_bench.json

Usage as a module::

    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = make_step(model, optimizer, "bfloat16")
    loss = step(images, labels)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED_PARAMS = 8_215_568

NUM_CLASSES = 10
PRIMARY_TYPES = 32
PRIMARY_DIM = 8
DIGIT_DIM = 16
M_PLUS = 0.9
M_MINUS = 0.1
LAMBDA_NEG = 0.5
RECON_WEIGHT = 0.0005
EPS = 1e-7


def squash(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
  """squash(s) = |s|^2 / (1 + |s|^2) * s / |s|, NaN-free at s = 0."""
  sq = (s * s).sum(dim=dim, keepdim=True)
  norm = torch.sqrt(sq + eps)  # safe norm: epsilon inside the sqrt
  return (sq / (1.0 + sq)) * (s / norm)


def safe_length(
    v: torch.Tensor, dim: int = -1, eps: float = EPS
) -> torch.Tensor:
  return torch.sqrt((v * v).sum(dim=dim) + eps)


class PrimaryCaps(nn.Module):
  """Conv 9x9 stride 2, 256 maps read as 32 capsule types of 8D each.

  Capsule type k is channels [8k, 8k+8) (grouped by channel, not by spatial
  position). Capsules are ordered (row, col, type), i.e. the order an NHWC
  reshape (B, 6, 6, 32, 8) -> (B, 1152, 8) gives, as in a JAX/Flax port.
  """

  def __init__(
      self,
      in_channels: int = 256,
      types: int = PRIMARY_TYPES,
      dim: int = PRIMARY_DIM,
  ):
    super().__init__()
    self.types, self.dim = types, dim
    self.conv = nn.Conv2d(in_channels, types * dim, kernel_size=9, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv(x)  # (B, 256, 6, 6)
    b, _, h, w = out.shape
    out = out.permute(0, 2, 3, 1).reshape(b, h * w * self.types, self.dim)
    return squash(out)  # (B, 1152, 8)


class DigitCaps(nn.Module):
  """u_hat[j|i] = W[i, j] u[i] (no bias), then routing by agreement."""

  def __init__(
      self,
      in_caps: int = 1152,
      in_dim: int = PRIMARY_DIM,
      out_caps: int = NUM_CLASSES,
      out_dim: int = DIGIT_DIM,
      iterations: int = 3,
      stop_grad_intermediate: bool = False,
  ):
    super().__init__()
    self.iterations = iterations
    # Official code lets gradients flow through every iteration (default);
    # several ports detach u_hat in all but the last iteration.
    self.stop_grad_intermediate = stop_grad_intermediate
    self.W = nn.Parameter(
        0.01 * torch.randn(in_caps, out_caps, out_dim, in_dim)
    )

  def forward(self, u: torch.Tensor) -> torch.Tensor:
    # u: (B, 1152, 8) -> u_hat: (B, 1152, 10, 16)
    u_hat = torch.einsum("ijdk,bik->bijd", self.W, u)
    # Per-example routing logits, never shared across the batch.
    # (Under autocast u_hat may be bfloat16; routing state follows it.)
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)
    u_hat_routing = u_hat.detach() if self.stop_grad_intermediate else u_hat
    v = None
    for r in range(self.iterations):
      c = F.softmax(b, dim=2)  # over the parents j
      last = r == self.iterations - 1
      uh = u_hat if last else u_hat_routing
      s = (c.unsqueeze(-1) * uh).sum(dim=1)  # (B, 10, 16)
      v = squash(s)
      if not last:
        b = b + (uh * v.unsqueeze(1)).sum(dim=-1)  # agreement
    return v


class Decoder(nn.Module):

  def __init__(self, in_features: int = NUM_CLASSES * DIGIT_DIM):
    super().__init__()
    self.net = nn.Sequential(
        nn.Linear(in_features, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, 784),
        nn.Sigmoid(),
    )

  def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = v * mask.unsqueeze(-1).to(v.dtype)  # (B, 10, 16)
    return self.net(masked.flatten(1))  # (B, 784)


class CapsNet(nn.Module):

  def __init__(
      self, routing_iterations: int = 3, stop_grad_intermediate: bool = False
  ):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 256, kernel_size=9, stride=1)
    self.primary = PrimaryCaps()
    self.digits = DigitCaps(
        iterations=routing_iterations,
        stop_grad_intermediate=stop_grad_intermediate,
    )
    self.decoder = Decoder()

  def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
    h = F.relu(self.conv1(x), inplace=True)  # (B, 256, 20, 20)
    u = self.primary(h)  # (B, 1152, 8)
    v = self.digits(u)  # (B, 10, 16)
    lengths = safe_length(v.float())  # (B, 10)
    if labels is None:  # test time: mask by the longest capsule
      labels = lengths.argmax(dim=1)
    mask = F.one_hot(labels, NUM_CLASSES)
    recon = self.decoder(v, mask)
    return lengths, recon


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  t = F.one_hot(labels, NUM_CLASSES).to(lengths.dtype)
  pos = t * F.relu(M_PLUS - lengths).pow(2)
  neg = LAMBDA_NEG * (1.0 - t) * F.relu(lengths - M_MINUS).pow(2)
  return (pos + neg).sum(dim=1).mean()


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
  diff = recon.float() - images.flatten(1).float()
  return RECON_WEIGHT * diff.pow(2).sum(dim=1).mean()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def build_model(seed: int = 0, **kwargs) -> CapsNet:
  torch.manual_seed(seed)
  model = CapsNet(**kwargs)
  n = count_params(model)
  assert n == EXPECTED_PARAMS, f"parameter count {n} != {EXPECTED_PARAMS}"
  return model


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
  return torch.optim.Adam(model.parameters(), lr=lr)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: str = "float32",
):
  """Return step(images, labels) -> float loss: forward, both losses,
  backward and the Adam update. bfloat16 = autocast around forward + loss,
  parameters and optimizer state stay float32."""
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"unknown precision {precision!r}")
  use_autocast = precision == "bfloat16"

  def step(images: torch.Tensor, labels: torch.Tensor) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
      lengths, recon = model(images, labels)
      loss = margin_loss(lengths.float(), labels) + reconstruction_loss(
          recon, images
      )
    loss.backward()
    optimizer.step()
    return loss.item()  # CPU is synchronous anyway; .item() makes it explicit

  return step


def random_batch(batch_size: int, seed: int = 1):
  g = torch.Generator().manual_seed(seed)
  images = torch.rand(batch_size, 1, 28, 28, generator=g)  # in [0, 1]
  labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
  return images, labels


def benchmark(
    precision: str,
    batch_size: int,
    steps: int,
    warmup: int,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
  model = build_model(seed=seed)
  optimizer = make_optimizer(model)
  step = make_step(model, optimizer, precision)
  images, labels = random_batch(batch_size, seed=seed + 1)

  def log(msg):
    if verbose:
      print(msg, flush=True)

  for i in range(warmup):
    t0 = time.perf_counter()
    loss = step(images, labels)
    log(
        f"[{precision}] warmup {i + 1}/{warmup}: {time.perf_counter() - t0:.3f}"
        f" s  loss={loss:.4f}"
    )
  times = []
  losses = []
  for i in range(steps):
    t0 = time.perf_counter()
    loss = step(images, labels)
    dt = time.perf_counter() - t0
    times.append(dt)
    losses.append(loss)
    log(f"[{precision}] step {i + 1}/{steps}: {dt:.3f} s  loss={loss:.4f}")
  med = statistics.median(times)
  return {
      "median_step_s": med,
      "min_step_s": min(times),
      "max_step_s": max(times),
      "images_per_s": batch_size / med,
      "step_times_s": times,
      "losses": losses,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
      "--precision", choices=("float32", "bfloat16", "both"), default="both"
  )
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--out", type=str, default=None, help="write JSON results here"
  )
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error("--steps must be >= 1")

  torch.set_num_threads(args.threads)
  precisions = (
      ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
  )

  load_start = os.getloadavg()
  print(
      f"torch {torch.__version__}, threads={torch.get_num_threads()},"
      f" batch={args.batch_size}, steps={args.steps}, warmup={args.warmup},"
      f" cpu_capability={torch.backends.cpu.get_cpu_capability()}",
      flush=True,
  )
  results = {}
  for prec in precisions:
    results[prec] = benchmark(
        prec, args.batch_size, args.steps, args.warmup, seed=args.seed
    )
  load_end = os.getloadavg()

  print("\nsummary (seconds per training step, batch %d)" % args.batch_size)
  print(
      f"{'precision':<10} {'median':>8} {'min':>8} {'max':>8} {'images/s':>9}"
  )
  for prec, r in results.items():
    print(
        f"{prec:<10} {r['median_step_s']:8.3f} {r['min_step_s']:8.3f} "
        f"{r['max_step_s']:8.3f} {r['images_per_s']:9.1f}"
    )

  report = {
      "torch_version": torch.__version__,
      "threads": args.threads,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "warmup": args.warmup,
      "param_count": EXPECTED_PARAMS,
      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "loadavg_start": list(load_start),
      "loadavg_end": list(load_end),
      "results": results,
  }
  if args.out:
    d = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(d, exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
