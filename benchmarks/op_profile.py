"""Where a compiled step's time goes, operation by operation.

`jax.profiler.trace(..., create_perfetto_trace=True)` records one event per
XLA operation executed (on the CPU: per thunk, e.g. `ynn_fusion.17`,
`copy_bitcast_fusion.1`). `op_table` adds up those events per operation and
names each one back to the compiled HLO (`compiled.as_text()`): its output
shape and the `op_name` metadata, which holds the model scope it came from
(e.g. `.../primary_capsules/Conv2D_0/fmk,fkn->fmn/dot_general`) and whether
it belongs to the backward pass (`transpose(jvp(...))`).

Operations are put in three kinds by their HLO names: matrix products
(`dot`, the YNNPACK fusions XLA:CPU builds around them, cuBLAS GEMMs and
cuDNN convolutions on GPUs), copies and
transposes (layout changes, no arithmetic), and the rest (elementwise
fusions, reductions, slices). `benchmarks/train_step.py --profile DIR`
prints these tables for the training step.

Each operation's bytes accessed are counted as XLA's cost analysis counts
them (`compiled.cost_analysis()['bytes accessed']` is their sum over the
module): its output and every operand, each once (`bytes_accessed`). Over
its time in the trace that gives the rate at which it moves memory, to set
beside the machine's streaming rate: an operation far below it is bound by
something else (arithmetic, or an access pattern the CPU's caches and
prefetchers serve badly). It is a model of the traffic, not a measurement:
a product that re-reads a blocked operand moves more, and operands still
in the cache from the previous operation cost less.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable

# An instruction: its name, whole output shape (a tuple's too), opcode,
# operands and the rest of the line (attributes, metadata).
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = '
    r'(?P<shape>\((?:[^()]|\([^()]*\))*\)|\S+) '
    r'(?P<opcode>[\w\-]+)\((?P<operands>[^)]*)\)(?P<rest>.*)$', re.MULTILINE)
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
# The part of operations whose instruction carries no op_name (XLA's own:
# e.g. a layout copy of a parameter, or a broadcast it wrapped).
UNNAMED = 'not named in the HLO'

_ARRAY_SHAPE = re.compile(
    r'(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]')
_OPERAND = re.compile(r'%(?P<name>[\w.\-]+)')

# The model scope after the traced function's own prefix.
_SCOPE = re.compile(r'jvp\((?P<model>\w+)\)\)?/(?P<part>\w+)')


def hlo_operations(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{operation name: (output shape, op_name metadata, '' if none)} of an
  HLO module's instructions. Those without metadata are kept: XLA's own
  operations (layout copies, wrapped broadcasts, dots it split off) take
  time too, and a table without them would not add up to the step."""
  operations = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    op_name = _OP_NAME.search(match['rest'])
    operations[match['name']] = (match['shape'],
                                 op_name['op_name'] if op_name else '')
  return operations


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. 'f32[190,128,256]{2,1,0}' or a
  tuple '(f32[8]{0}, bf16[2,2]{1,0})'; tokens and opaque values count 0."""
  total = 0
  for match in _ARRAY_SHAPE.finditer(shape):
    dtype = match['dtype']
    if dtype == 'pred':
      bits = 8
    else:
      width = re.match(r'[a-z]+(\d+)', dtype)
      if not width:  # token[], opaque: no data.
        continue
      bits = int(width[1])
    elements = 1
    for size in filter(None, match['dims'].split(',')):
      elements *= int(size)
    total += (elements * bits + 7) // 8
  return total


def bytes_accessed(hlo_text: str) -> dict[str, int]:
  """{operation name: bytes its output and operands hold, each counted
  once}, the count that XLA's cost analysis sums to 'bytes accessed'."""
  shapes = {}
  accessed = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    shapes[match['name']] = shape_bytes(match['shape'])
    accessed[match['name']] = shapes[match['name']] + sum(
        shapes.get(operand['name'], 0)
        for operand in _OPERAND.finditer(match['operands']))
  return accessed


def kind(operation: str) -> str:
  """'matmul', 'copy' or 'other', from an XLA operation's name."""
  base = operation.split('.')[0]
  # XLA:CPU's dots and YNNPACK / oneDNN fusions; on GPUs cuBLAS GEMMs and
  # cuDNN convolutions.
  if base.startswith(('dot', 'ynn_fusion', 'onednn')) or any(
      word in base for word in ('gemm', 'matmul', 'cudnn-conv')):
    return 'matmul'
  if 'copy' in base or 'transpose' in base:
    return 'copy'
  return 'other'


def scope(op_name: str) -> tuple[str, str]:
  """(model part, 'forward' or 'backward') from an HLO op_name; `UNNAMED`
  and 'unknown' for an empty one."""
  if not op_name:
    return UNNAMED, 'unknown'
  direction = 'backward' if 'transpose(jvp(' in op_name else 'forward'
  match = _SCOPE.search(op_name)
  part = match['part'] if match else 'outside the model'
  return part, direction


def trace_events(directory: str | Path) -> list[dict[str, Any]]:
  """The complete ('X') events of the perfetto trace under `directory`."""
  paths = sorted(Path(directory).glob('**/*.trace.json.gz'))
  if not paths:
    raise FileNotFoundError(
        f'no *.trace.json.gz under {directory}: trace with '
        'jax.profiler.trace(directory, create_perfetto_trace=True)')
  with gzip.open(paths[-1], 'rt') as trace:
    events = json.load(trace)['traceEvents']
  return [event for event in events if event.get('ph') == 'X']


def op_table(events: Iterable[dict[str, Any]], hlo_text: str, steps: int
             ) -> list[dict[str, Any]]:
  """Per XLA operation of `hlo_text`: milliseconds per step (the events'
  durations, in microseconds, summed and divided by `steps`), its kind,
  shape, model part and direction, and its bytes accessed (per call, see
  `bytes_accessed`; zero where the HLO text does not give them); largest
  first. Events that are not operations of the module (Python, runtime
  waits) are left out."""
  operations = hlo_operations(hlo_text)
  accessed = bytes_accessed(hlo_text)
  totals: dict[str, float] = collections.Counter()
  calls: dict[str, int] = collections.Counter()
  for event in events:
    if event['name'] in operations:
      totals[event['name']] += event['dur']
      calls[event['name']] += 1
  rows = []
  for name, microseconds in totals.items():
    shape, op_name = operations[name]
    part, direction = scope(op_name)
    rows.append({'operation': name, 'ms_per_step': microseconds / 1e3 / steps,
                 'kind': kind(name), 'shape': shape, 'part': part,
                 'direction': direction, 'op_name': op_name,
                 'bytes_accessed': accessed.get(name, 0),
                 'calls_per_step': calls[name] / steps})
  return sorted(rows, key=lambda row: -row['ms_per_step'])


def totals_by(rows: Iterable[dict[str, Any]], *keys: str
              ) -> list[tuple[tuple[str, ...], float]]:
  """[(values of `keys`, ms per step)], largest first."""
  totals: dict[tuple[str, ...], float] = collections.Counter()
  for row in rows:
    totals[tuple(row[key] for key in keys)] += row['ms_per_step']
  return sorted(totals.items(), key=lambda item: -item[1])


def bytes_per_step(row: dict[str, Any]) -> float:
  """An `op_table` row's bytes accessed per step (per call x calls)."""
  return row['bytes_accessed'] * row['calls_per_step']


def memory_rate(rows: Iterable[dict[str, Any]]) -> float | None:
  """Bytes per second that `rows` move over the time they take (their
  bytes accessed per step over their milliseconds per step); None for no
  time."""
  rows = list(rows)
  seconds = sum(row['ms_per_step'] for row in rows) / 1e3
  return sum(map(bytes_per_step, rows)) / seconds if seconds > 0 else None
