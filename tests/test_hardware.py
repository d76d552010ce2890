"""train/hardware.py: the CPU's flags, and the one-line bfloat16 warning."""

import pytest

from train import hardware
from train.configs import default

CPUINFO = """\
processor\t: 0
model name\t: Some CPU
flags\t\t: fpu avx2 fma {extra}
"""


def test_bfloat16_instructions_are_read_from_cpuinfo():
  assert hardware.cpu_has_bfloat16(CPUINFO.format(extra='')) is False
  assert hardware.cpu_has_bfloat16(CPUINFO.format(extra='avx512_bf16'))
  assert hardware.cpu_has_bfloat16(CPUINFO.format(extra='amx_bf16 amx_tile'))
  # avx512f alone (e.g. Skylake) has no bfloat16 arithmetic.
  assert hardware.cpu_has_bfloat16(CPUINFO.format(extra='avx512f')) is False
  assert hardware.cpu_has_bfloat16('') is None
  info = hardware.cpuinfo(CPUINFO.format(extra='avx512f sse4_2'))
  assert info == {'cpu_model': 'Some CPU',
                  'flags': ['avx2', 'avx512f', 'fma']}


def test_family_and_model_numbers_name_a_generic_model():
  # A virtual machine often reports a generic model name: the numbers are
  # what tell one microarchitecture from another.
  text = ('processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\n'
          'model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 8\n'
          'flags\t\t: avx2 amx_bf16\n'
          'processor\t: 1\ncpu family\t: 6\nmodel\t\t: 999\n')
  info = hardware.cpuinfo(text)
  assert (info['cpu_family'], info['cpu_model_number'],
          info['cpu_stepping']) == (6, 143, 8)
  assert hardware.describe_cpu(info) == (
      'Intel(R) Xeon(R) Processor (family 6, model 143)')
  # Records without the numbers (or with them unknown) keep the name.
  assert hardware.describe_cpu({'cpu_model': 'Some CPU',
                                'cpu_family': None}) == 'Some CPU'


@pytest.mark.parametrize('precision,extra,warned', [
    ('bfloat16', '', True), ('bfloat16', 'avx512_bf16', False),
    ('bfloat16', 'amx_bf16', False), ('float32', '', False)])
def test_bfloat16_without_the_instructions_is_one_warning(precision, extra,
                                                          warned):
  config = default.get_config()
  config.precision = precision
  warning = hardware.precision_warning(config, CPUINFO.format(extra=extra))
  assert (warning is not None) == warned
  if warned:
    assert '\n' not in warning and 'emulates' in warning
