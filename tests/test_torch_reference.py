"""Smoke test of the PyTorch baseline (benchmarks/torch_reference.py).

torch is not a dependency of capsjax: this test is skipped unless torch is
importable in the interpreter running pytest (e.g. the benchmark venv). The
script itself runs in a subprocess, with $CAPSJAX_TORCH_PYTHON if set, else
with the interpreter running pytest.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip(
    "torch", reason="torch not installed: the PyTorch baseline is optional"
)

SCRIPT = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
)
EXPECTED_PARAMS = 8_215_568


def _load_module():
  spec = importlib.util.spec_from_file_location("torch_reference", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_param_count():
  mod = _load_module()
  model = mod.build_model()
  assert mod.EXPECTED_PARAMS == EXPECTED_PARAMS
  assert mod.count_params(model) == EXPECTED_PARAMS
  per_part = {
      name: mod.count_params(getattr(model, name))
      for name in ("conv1", "primary", "digits", "decoder")
  }
  assert per_part == {
      "conv1": 20_992,
      "primary": 5_308_672,
      "digits": 1_474_560,
      "decoder": 1_411_344,
  }


def test_forward_shapes_and_batch_independence():
  mod = _load_module()
  torch.manual_seed(0)
  model = mod.build_model().eval()
  x, y = mod.random_batch(3)
  with torch.no_grad():
    lengths, recon = model(x, y)
    lengths1, _ = model(x[:1], y[:1])
  assert lengths.shape == (3, 10) and recon.shape == (3, 784)
  assert torch.all(lengths < 1) and torch.all(lengths >= 0)
  # per-example routing: the prediction must not depend on the rest of the batch
  torch.testing.assert_close(lengths[:1], lengths1, rtol=1e-4, atol=1e-5)


def test_squash_nan_free_at_zero():
  mod = _load_module()
  s = torch.zeros(2, 16, requires_grad=True)
  v = mod.squash(s)
  v.sum().backward()
  assert torch.isfinite(v).all() and torch.isfinite(s.grad).all()


def test_tiny_benchmark_subprocess(tmp_path):
  python = os.environ.get("CAPSJAX_TORCH_PYTHON", sys.executable)
  out = tmp_path / "tiny.json"
  # One thread keeps this light on a shared machine (pytest runs with -n 2);
  # bfloat16 on a CPU without native bf16 support (AVX2 only) uses slow
  # reference kernels, so even this tiny step takes seconds.
  cmd = [python, str(SCRIPT), "--batch-size", "2", "--steps", "1",
         "--warmup", "0", "--precision", "both", "--threads", "1",
         "--out", str(out)]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  for key in ("torch_version", "threads", "batch_size", "results"):
    assert key in report
  assert report["threads"] == 1 and report["batch_size"] == 2
  assert report["param_count"] == EXPECTED_PARAMS
  assert set(report["results"]) == {"float32", "bfloat16"}
  for prec, r in report["results"].items():
    assert r["median_step_s"] > 0, prec
    assert r["images_per_s"] > 0, prec
    assert len(r["step_times_s"]) == 1 and all(t > 0 for t in r["step_times_s"])
  assert "summary" in proc.stdout
