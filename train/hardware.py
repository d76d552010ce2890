"""What the CPU can do, from /proc/cpuinfo: its model, the instruction-set
flags that decide a step's speed, and whether bfloat16 runs in hardware."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Light to import: benchmarks/summarize.py reads JSON only.
  import ml_collections

# The /proc/cpuinfo flags recorded with every speed figure.
RECORDED_CPU_FLAGS = frozenset({
    'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni',
    'avx512_bf16', 'avx512_fp16', 'avx_vnni', 'amx_tile', 'amx_bf16',
    'amx_int8'})
# Either is bfloat16 arithmetic in hardware: AVX-512 bfloat16 dot products
# (AMD Zen 4 and later, Intel Cooper Lake and later) or AMX tiles (Intel
# Sapphire Rapids and later). Without them XLA emulates bfloat16 in float32,
# slower than float32 itself.
BFLOAT16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


# x86 identification numbers, kept as ints: a virtual machine's model name
# is often generic ('Intel(R) Xeon(R) Processor'), its family and model are
# what tell the microarchitecture apart.
_CPU_NUMBERS = {'cpu family': 'cpu_family', 'model': 'cpu_model_number',
                'stepping': 'cpu_stepping'}


def cpuinfo(text: str | None = None) -> dict[str, Any]:
  """CPU model name, family, model and stepping numbers (where listed) and
  its recorded flags, from the first processor of /proc/cpuinfo (or
  `text`); {} where there is no such file."""
  info: dict[str, Any] = {}
  if text is None:
    try:
      text = Path('/proc/cpuinfo').read_text()
    except OSError:
      return info
  for line in text.splitlines():
    key, _, value = line.partition(':')
    key, value = key.strip(), value.strip()
    if key == 'model name' and 'cpu_model' not in info:
      info['cpu_model'] = value
    elif key in _CPU_NUMBERS and _CPU_NUMBERS[key] not in info:
      if value.isdigit():
        info[_CPU_NUMBERS[key]] = int(value)
    elif key == 'flags' and 'flags' not in info:
      info['flags'] = sorted(set(value.split()) & RECORDED_CPU_FLAGS)
  return info


def describe_cpu(info: dict[str, Any]) -> str:
  """'<model name> (family F, model M)' of a `cpuinfo` result, the numbers
  where known."""
  numbers = [f'{label} {info[key]}' for label, key in
             (('family', 'cpu_family'), ('model', 'cpu_model_number'))
             if info.get(key) is not None]
  name = info.get('cpu_model', 'unknown CPU')
  return f"{name} ({', '.join(numbers)})" if numbers else name


def cpu_has_bfloat16(cpuinfo_text: str | None = None) -> bool | None:
  """Whether the CPU has bfloat16 instructions (`BFLOAT16_CPU_FLAGS`) per
  /proc/cpuinfo (or `cpuinfo_text`); None where there is no such file."""
  flags = cpuinfo(cpuinfo_text).get('flags')
  if flags is None:
    return None
  return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def precision_warning(config: ml_collections.ConfigDict,
                      cpuinfo_text: str | None = None) -> str | None:
  """One line when config.precision is bfloat16 on a CPU that emulates it,
  else None."""
  import jax  # pylint: disable=g-import-not-at-top
  if (config.precision != 'bfloat16' or jax.default_backend() != 'cpu'
      or cpu_has_bfloat16(cpuinfo_text) is not False):
    return None
  return ("warning: config.precision='bfloat16' on a CPU without bfloat16 "
          f"instructions (none of {', '.join(BFLOAT16_CPU_FLAGS)} in "
          '/proc/cpuinfo): XLA emulates it in float32, so it is slower '
          "than config.precision='float32' here")
