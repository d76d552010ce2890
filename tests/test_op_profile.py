"""Tests of benchmarks/op_profile.py: naming a trace's events after the HLO."""

import gzip
import json

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
