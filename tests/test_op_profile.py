"""Tests of benchmarks/op_profile.py: naming a trace's events after the HLO,
and the bytes each operation accesses."""

import gzip
import json
import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import op_profile

HLO = """
ENTRY %main {
  %ynn_fusion.3 = f32[190,128,256]{2,1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_step)/jvp(CapsNet)/primary_capsules/Conv2D_0/fmk,fkn->fmn/dot_general" stack_frame_id=1}
  %copy_bitcast_fusion.1 = f32[655360,38]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(CapsNet))/primary_capsules/Conv2D_0/reshape"}
  ROOT %add.7 = f32[8]{0} add(%d, %e), metadata={op_name="jit(train_step)/add"}
  %no_metadata.1 = f32[8]{0} add(%d, %e)
}
"""


def test_hlo_operations_read_shape_and_scope():
  operations = op_profile.hlo_operations(HLO)
  assert set(operations) == {'ynn_fusion.3', 'copy_bitcast_fusion.1',
                             'add.7', 'no_metadata.1'}
  assert operations['add.7'] == ('f32[8]{0}', 'jit(train_step)/add')
  # XLA's own operations carry no op_name but take time: kept, unnamed.
  assert operations['no_metadata.1'] == ('f32[8]{0}', '')
  assert op_profile.scope('') == (op_profile.UNNAMED, 'unknown')


@pytest.mark.parametrize('name, kind', [
    ('dot.68', 'matmul'), ('ynn_fusion.17', 'matmul'),
    ('cublas-gemm.3', 'matmul'), ('cudnn-conv.1', 'matmul'),
    ('copy_bitcast_fusion.1', 'copy'), ('transpose_copy_fusion.15', 'copy'),
    ('bitcast_add_fusion', 'other'), ('stack.166', 'other')])
def test_kind(name, kind):
  assert op_profile.kind(name) == kind


@pytest.mark.parametrize('op_name, expected', [
    ('jit(train_step)/jvp(CapsNet)/class_capsules/jit(dynamic_routing)',
     ('class_capsules', 'forward')),
    ('jit(train_step)/transpose(jvp(CapsNet))/primary_capsules/Conv2D_0/neg',
     ('primary_capsules', 'backward')),
    ('jit(train_step)/jvp()/sub', ('outside the model', 'forward')),
    ('jit(train_step)/add', ('outside the model', 'forward'))])
def test_scope(op_name, expected):
  assert op_profile.scope(op_name) == expected


def test_op_table_sums_events_per_step_and_leaves_out_the_rest():
  events = [
      {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 30_000},
      {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 50_000},
      {'ph': 'X', 'name': 'copy_bitcast_fusion.1', 'dur': 20_000},
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 900_000},
  ]
  rows = op_profile.op_table(events, HLO, steps=2)
  assert [row['operation'] for row in rows] == ['ynn_fusion.3',
                                               'copy_bitcast_fusion.1']
  assert rows[0]['ms_per_step'] == pytest.approx(40.0)
  assert rows[1]['ms_per_step'] == pytest.approx(10.0)
  assert rows[1]['kind'] == 'copy'
  assert rows[1]['direction'] == 'backward'
  # Two calls of ynn_fusion.3 in two steps; its output (its operands are
  # not in this HLO text) 190 x 128 x 256 float32.
  assert rows[0]['calls_per_step'] == 1.0
  assert rows[0]['bytes_accessed'] == 190 * 128 * 256 * 4
  assert op_profile.totals_by(rows, 'kind') == [(('matmul',), 40.0),
                                                (('copy',), 10.0)]


def test_trace_events_reads_only_complete_events(tmp_path):
  path = tmp_path / 'plugins' / 'profile' / 'run' / 'host.trace.json.gz'
  path.parent.mkdir(parents=True)
  with gzip.open(path, 'wt') as trace:
    json.dump({'traceEvents': [{'ph': 'X', 'name': 'a', 'dur': 1},
                               {'ph': 'M', 'name': 'process_name'}]}, trace)
  assert op_profile.trace_events(tmp_path) == [{'ph': 'X', 'name': 'a',
                                                'dur': 1}]
  with pytest.raises(FileNotFoundError, match='create_perfetto_trace'):
    op_profile.trace_events(tmp_path / 'plugins' / 'missing')


@pytest.mark.parametrize('shape, expected', [
    ('f32[190,128,256]{2,1,0}', 190 * 128 * 256 * 4),
    ('bf16[3,5]{1,0}', 30), ('pred[7]{0}', 7), ('f32[]', 4),
    ('(f32[8]{0}, s32[2]{0})', 40), ('s4[3]{0}', 2), ('token[]', 0),
    ('f8e4m3fn[4]{0}', 4)])
def test_shape_bytes(shape, expected):
  assert op_profile.shape_bytes(shape) == expected


def test_bytes_accessed_counts_output_and_operands_once():
  hlo = """
ENTRY %main {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %dot.1 = f32[4,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %fusion.2 = (f32[4,2]{1,0}, f32[4]{0}) fusion(%dot.1, %dot.1), kind=kLoop, calls=%c
  ROOT %gte = f32[4]{0} get-tuple-element(%fusion.2), index=1
}
"""
  accessed = op_profile.bytes_accessed(hlo)
  assert accessed['dot.1'] == (32 + 16 + 8) * 4
  # A tuple output counts every element; an operand used twice, twice.
  assert accessed['fusion.2'] == (8 + 4) * 4 + 2 * 8 * 4


def test_bytes_accessed_adds_up_to_xla_cost_analysis():
  def step(x, w):
    return jnp.tanh(x @ w).T @ x + jnp.sum(w)

  compiled = jax.jit(step).lower(jnp.ones((64, 32)),
                                 jnp.ones((32, 32))).compile()
  accessed = op_profile.bytes_accessed(compiled.as_text())
  # XLA counts the entry computation's operations that do work.
  entry = compiled.as_text().split('\nENTRY')[1]
  total = 0
  for line in entry.splitlines():
    match = re.match(
        r'\s*(?:ROOT )?%([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(', line)
    if match and match[2] not in ('parameter', 'constant',
                                  'get-tuple-element', 'tuple', 'bitcast'):
      total += accessed[match[1]]
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  assert total == analysis['bytes accessed']


def test_memory_rate_over_the_rows_time():
  rows = [{'ms_per_step': 10.0, 'bytes_accessed': 100e6,
           'calls_per_step': 2.0},
          {'ms_per_step': 30.0, 'bytes_accessed': 200e6,
           'calls_per_step': 1.0}]
  assert op_profile.bytes_per_step(rows[0]) == 200e6
  assert op_profile.memory_rate(rows) == pytest.approx(400e6 / 0.04)
  assert op_profile.memory_rate([]) is None


def test_a_real_trace_names_the_compiled_operations(tmp_path):
  def step(x, w):
    return jnp.tanh(x @ w).T @ x

  x = jnp.ones((64, 32))
  w = jnp.ones((32, 32))
  compiled = jax.jit(step).lower(x, w).compile()
  jax.block_until_ready(compiled(x, w))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      jax.block_until_ready(compiled(x, w))
  rows = op_profile.op_table(op_profile.trace_events(tmp_path),
                             compiled.as_text(), steps=2)
  assert rows, 'no event of the trace matched an operation of the HLO'
  assert any(row['kind'] == 'matmul' for row in rows)
  assert all(row['ms_per_step'] >= 0 for row in rows)
