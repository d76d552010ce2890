"""Smoke tests of benchmarks/routing_iterations.py and benchmarks/train_step.py.

Each script runs in this process at its smallest setting (batch 2, tiny
shapes, `--small` model, one repeat) and its JSON is checked for the
documented keys with positive numbers. Compilation dominates: the tests
compile as few training steps as they can (the base train state is made once
per process by benchmarks.common.create_state).
"""

import argparse
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common
from benchmarks import conv_methods
from benchmarks import epoch
from benchmarks import routing_algorithms
from benchmarks import routing_iterations
from benchmarks import steps_in_flight
from benchmarks import train_step
from train import host_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ('median_s', 'min_s', 'max_s', 'mean_s', 'compile_s',
               'images_per_s')
MACHINE_KEYS = ('cpu_model', 'cpu_count', 'cpus_usable', 'jax', 'jaxlib',
                'loadavg', 'backend', 'device_kind')


def positive(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def check_timed(result: dict, what: str) -> None:
  for key in TIMING_KEYS:
    assert positive(result[key]), (what, key, result[key])
  assert result['iqr_s'] >= 0, what
  assert result['min_s'] <= result['median_s'] <= result['max_s'], what
  assert result['repeats'] == len(result['times_s']) >= 1, what
  check_memory(result['memory'], what)


def check_memory(memory: dict, what: str) -> None:
  for key in ('peak_bytes', 'argument_bytes', 'output_bytes', 'temp_bytes'):
    assert positive(memory[key]), (what, key, memory)
  assert memory['peak_bytes'] == (memory['argument_bytes']
                                  + memory['output_bytes']
                                  - memory['alias_bytes']
                                  + memory['temp_bytes'])


def check_machine(machine: dict) -> None:
  for key in MACHINE_KEYS:
    assert machine[key], key
  # Every figure names the CPU flags it ran on.
  assert isinstance(machine['cpu_flags'], list)
  assert machine['cpu_bfloat16'] in (True, False, None)


def check_png(path: Path) -> None:
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert path.stat().st_size > 5000


ROUTING_TINY = ['--shape', '2,8,3,4,4', '--batch-size', '2', '--small',
                '--repeats', '1', '--warmup', '0']


def test_routing_iterations_routing_alone(tmp_path, capsys):
  out, png = tmp_path / 'routing.json', tmp_path / 'routing.png'
  routing_iterations.main(ROUTING_TINY + [
      '--iterations', '1,2', '--stop-gradient', 'false,true',
      '--no-train-step', '--out', str(out), '--plot', str(png)])
  report = json.loads(out.read_text())
  assert report['benchmark'] == 'routing_iterations'
  assert report['settings']['shape'] == [2, 8, 3, 4, 4]
  rows = report['results']
  assert [(row['iterations'], row['stop_gradient_intermediate'])
          for row in rows] == [(1, False), (1, True), (2, False), (2, True)]
  for row in rows:
    for key in ('routing_forward', 'routing_forward_backward'):
      check_timed(row[key], key)
    assert row['train_step'] is None
  finding = report['memory_finding']
  assert set(finding['routing_forward_backward']) == {
      'stop_gradient_intermediate=True', 'stop_gradient_intermediate=False'}
  assert 'stop_gradient_intermediate=True' in finding['sentence']
  check_machine(report['machine'])
  check_png(png)
  printed = capsys.readouterr().out
  assert 'route fwd+bwd ms' in printed and finding['sentence'] in printed


def test_routing_iterations_with_train_step(tmp_path):
  out, png = tmp_path / 'routing.json', tmp_path / 'routing.png'
  routing_iterations.main(ROUTING_TINY + [
      '--iterations', '1', '--stop-gradient', 'true', '--out', str(out),
      '--plot', str(png)])
  (row,) = json.loads(out.read_text())['results']
  check_timed(row['train_step'], 'train_step')
  assert row['train_step']['memory']['alias_bytes'] > 0  # the donated state
  check_png(png)


def test_routing_iterations_memory_finding(tmp_path):
  """Compile only (--repeats 0): the memory of the backward pass stays flat
  with the stopped gradient, and grows without it."""
  out = tmp_path / 'memory.json'
  report = routing_iterations.main([
      '--shape', '4,64,8,4,8', '--iterations', '3,4', '--stop-gradient',
      'false,true', '--repeats', '0', '--no-train-step', '--out', str(out)])
  for row in report['results']:
    result = row['routing_forward_backward']
    assert result['median_s'] is None and result['images_per_s'] is None
    assert positive(result['compile_s'])
    check_memory(result['memory'], 'compile only')
  trends = json.loads(out.read_text())['memory_finding'][
      'routing_forward_backward']
  assert trends['stop_gradient_intermediate=True']['flat_from'] == 3
  assert trends['stop_gradient_intermediate=False']['flat_from'] is None
  assert trends['stop_gradient_intermediate=False'][
      'growth_mb_per_iteration'] > 0


def test_routing_iterations_accuracy(tmp_path, monkeypatch):
  """--accuracy's plumbing, with train_and_evaluate stood in for (a real
  training is tested in tests/test_train.py)."""
  configs = []

  def fake_train_and_evaluate(config, workdir):
    configs.append((config, Path(workdir)))
    accuracy = 0.5 + 0.1 * config.model.routing_iterations
    return {'validation_accuracy': accuracy, 'test_accuracy': accuracy - 0.01,
            'test_examples': config.num_eval_examples, 'checkpoint_step': 3}

  monkeypatch.setattr(common.train_lib, 'train_and_evaluate',
                      fake_train_and_evaluate)
  out, png = tmp_path / 'accuracy.json', tmp_path / 'accuracy.png'
  routing_iterations.main(ROUTING_TINY + [
      '--iterations', '1,2', '--stop-gradient', 'false', '--no-train-step',
      '--accuracy', '--epochs', '2', '--max-steps', '3', '--train-examples',
      '64', '--eval-examples', '32', '--workdir', str(tmp_path / 'runs'),
      '--out', str(out), '--plot', str(png)])
  assert [config.model.routing_iterations for config, _ in configs] == [1, 2]
  for config, workdir in configs:
    assert (config.num_epochs, config.max_steps, config.num_train_examples,
            config.num_eval_examples, config.batch_size) == (2, 3, 64, 32, 2)
    assert config.model.stop_gradient_intermediate is False
    assert workdir.parent == tmp_path / 'runs'
  assert len({workdir for _, workdir in configs}) == 2
  rows = json.loads(out.read_text())['results']
  assert [row['accuracy']['validation_accuracy'] for row in rows] == [
      pytest.approx(0.6), pytest.approx(0.7)]
  assert all(positive(row['accuracy']['wall_s']) for row in rows)
  check_png(png)


def test_routing_algorithms_cost(tmp_path, capsys):
  """Every algorithm timed and its memory measured; the iterative ones at
  each iteration count, the others once; EM's memory grows with r."""
  out, png = tmp_path / 'algorithms.json', tmp_path / 'algorithms.png'
  report = routing_algorithms.main([
      '--shape', '2,8,3,16', '--iterations', '1,3', '--repeats', '1',
      '--warmup', '0', '--out', str(out), '--plot', str(png)])
  assert json.loads(out.read_text())['benchmark'] == 'routing_algorithms'
  assert [(row['algorithm'], row['iterations']) for row in report['cost']] == [
      ('dynamic', 1), ('dynamic', 3), ('em', 1), ('em', 3),
      ('self_attention', None), ('none', None)]
  for row in report['cost']:
    for key in ('forward', 'forward_backward'):
      check_timed(row[key], (row['algorithm'], key))
  em = [row['forward_backward']['memory']['peak_bytes']
        for row in report['cost'] if row['algorithm'] == 'em']
  assert em[1] > em[0]  # the unrolled E- and M-steps are kept for backward
  check_machine(report['machine'])
  check_png(png)
  assert 'fwd+bwd MB' in capsys.readouterr().out


def test_routing_algorithms_accuracy(tmp_path, monkeypatch):
  """--accuracy trains the same network with each algorithm on each
  dataset within one budget (train_and_evaluate stood in for)."""
  configs = []

  def fake_train_and_evaluate(config, workdir):
    configs.append((config, Path(workdir)))
    return {'validation_accuracy': 0.9, 'test_accuracy': 0.8,
            'test_examples': config.num_eval_examples, 'checkpoint_step': 5}

  monkeypatch.setattr(common.train_lib, 'train_and_evaluate',
                      fake_train_and_evaluate)
  out, png = tmp_path / 'accuracy.json', tmp_path / 'accuracy.png'
  report = routing_algorithms.main([
      '--no-cost', '--accuracy', '--algorithms', 'dynamic,none',
      '--max-steps', '5', '--train-examples', '64', '--batch-size', '4',
      '--workdir', str(tmp_path / 'runs'), '--out', str(out),
      '--plot', str(png)])
  assert [(config.dataset, config.model.routing) for config, _ in configs] == [
      ('mnist', 'dynamic'), ('mnist', 'none'), ('fashion_mnist', 'dynamic'),
      ('fashion_mnist', 'none')]
  budgets = {(config.max_steps, config.num_train_examples, config.batch_size,
              config.model.routing_iterations) for config, _ in configs}
  assert budgets == {(5, 64, 4, 3)}
  assert len({workdir for _, workdir in configs}) == 4
  assert [row['iterations'] for row in report['accuracy']] == [3, None] * 2
  check_png(png)

  # --merge: this run's accuracy and a cost report, one table and plot.
  cost = tmp_path / 'cost.json'
  cost.write_text(json.dumps({
      'benchmark': 'routing_algorithms', 'settings': {'shape': [2, 8, 3, 16]},
      'cost': [{'algorithm': 'none', 'iterations': None,
                'forward': {'median_s': 1e-3, 'iqr_s': 0.0,
                            'memory': {'peak_bytes': 1e6}},
                'forward_backward': {'median_s': 2e-3, 'iqr_s': 0.0,
                                     'compile_s': 1.0,
                                     'memory': {'peak_bytes': 2e6}}}],
      'accuracy': [], 'machine': {}}))
  merged = routing_algorithms.main(['--merge', str(cost), str(out), '--out',
                                    str(tmp_path / 'merged.json'), '--plot',
                                    str(tmp_path / 'merged.png')])
  assert len(merged['cost']) == 1 and merged['accuracy'] == report['accuracy']
  check_png(tmp_path / 'merged.png')


def test_routing_algorithms_flags_are_checked():
  for argv in (['--algorithms', 'k_means'], ['--shape', '2,8,3,8'],
               ['--no-cost'], ['--accuracy', '--epochs', '0']):
    with pytest.raises(SystemExit):
      routing_algorithms.parse_args(argv)


def test_memory_trend():
  flat = routing_iterations.memory_trend([(3, 206.4), (1, 11.9), (2, 112.7),
                                          (4, 206.4), (5, 206.4)])
  assert flat['iterations'] == [1, 2, 3, 4, 5]
  assert flat['flat_from'] == 3 and flat['growth_mb_per_iteration'] == 0
  growing = routing_iterations.memory_trend([(3, 422.3), (4, 435.6),
                                             (5, 448.8)])
  assert growing['flat_from'] is None
  assert growing['growth_mb_per_iteration'] == pytest.approx(13.2)
  single = routing_iterations.memory_trend([(3, 1.0)])
  assert single['growth_mb_per_iteration'] is None


def test_train_step(tmp_path, capsys):
  out = tmp_path / 'train_step.json'
  # float32's step is compiled by test_routing_iterations_with_train_step.
  train_step.main(['--precision', 'bfloat16', '--small',
                   '--batch-size', '2', '--steps', '1', '--warmup', '0',
                   '--min-timed-seconds', '0.3', '--breakdown',
                   '--emulated-bfloat16', '--evaluation',
                   '--evaluation-rounds', '2', '--out', str(out)])
  report = json.loads(out.read_text())
  assert set(report) >= {'results', 'torch', 'machine', 'settings',
                         'breakdown', 'evaluation'}
  # Evaluation against training: one ratio a round, from that round's own
  # evaluation call (a stack of eval_batches_per_call batches) and steps.
  evaluation = report['evaluation']['bfloat16']
  batches_per_call = evaluation['eval_batches_per_call']
  assert evaluation['images_per_call'] == 2 * batches_per_call
  assert evaluation['steps_per_round'] >= 1
  assert len(evaluation['ratios']) == len(evaluation['eval_call_s']) == len(
      evaluation['train_step_s']) == 2
  for eval_s, train_s, ratio in zip(evaluation['eval_call_s'],
                                    evaluation['train_step_s'],
                                    evaluation['ratios']):
    assert ratio == pytest.approx(
        (2 * batches_per_call / eval_s) / (2 / train_s))
  assert evaluation['median_ratio'] == pytest.approx(
      np.median(evaluation['ratios']))
  assert report['settings']['evaluation_rounds'] == 2
  assert set(report['results']) == {'bfloat16'}
  for precision, result in report['results'].items():
    for key in ('median_step_s', 'min_step_s', 'max_step_s', 'images_per_s',
                'compile_s', 'flops_per_step', 'flops_executed',
                'flops_per_s', 'fraction_of_matmul_peak'):
      assert positive(result[key]), (precision, key)
    # Model FLOPs (the direct method's), whatever the convolution executes.
    assert result['flops_source'] == 'analytic'
    assert result['flops_per_step'] == common.capsnet_step_flops(
        common.make_config(batch_size=2, precision=precision,
                                      small=True), 2)
    assert result['step_times_s'] and all(map(positive,
                                              result['step_times_s']))
    # One step asked for, but steps timed for 0.3 s at least.
    assert result['steps_timed'] == len(result['step_times_s'])
    assert sum(result['step_times_s']) >= 0.3
    # Minor page faults of each timed step, where the OS counts them.
    if common.minor_page_faults() is not None:
      assert len(result['page_faults_per_step']) == len(
          result['step_times_s'])
      assert all(faults >= 0 for faults in result['page_faults_per_step'])
      assert result['median_page_faults'] >= 0
    check_memory(result['memory'], precision)
    matmul = result['matmul']
    assert matmul['dtype'] == precision and positive(matmul['flops_per_s'])
    # Memory traffic: XLA's bytes accessed against the same run's streaming
    # rate, whose own bytes are XLA's count of y = 2 x (input and output).
    stream = result['stream']
    assert stream['bytes'] == 2 * stream['array_bytes']
    assert stream['bytes_per_s'] == pytest.approx(
        stream['bytes'] / stream['median_s'])
    if stream['median_page_faults'] is not None:  # No fresh memory mapped.
      assert stream['median_page_faults'] < stream['array_bytes'] / 4096 / 10
    assert positive(result['bytes_accessed'])
    assert result['bytes_at_stream_rate_fraction'] == pytest.approx(
        result['bytes_accessed'] / stream['bytes_per_s'] /
        result['median_step_s'])
    parts = report['breakdown'][precision]['parts']
    assert len(parts) == 8
    for name, part in parts.items():
      timings = [t for t in (part['forward'], part['forward_backward']) if t]
      assert timings and all(positive(t['median_s']) for t in timings), name
  assert report['torch'] is None and report['speed_ratios'] is None
  check_machine(report['machine'])
  printed = capsys.readouterr().out
  assert 'of matmul rate' in printed and 'full training step' in printed
  assert "memory traffic: XLA's bytes accessed per step" in printed
  assert 'evaluation against training, 2 rounds' in printed


def test_train_step_profiles_the_step_and_each_experiment(tmp_path, capsys):
  out = tmp_path / 'train_step.json'
  traces = tmp_path / 'trace'
  train_step.main(['--precision', 'float32', '--small', '--batch-size', '2',
                   '--steps', '1', '--warmup', '0', '--experiments', 'lenet5',
                   '--min-timed-seconds', '0',
                   '--profile', str(traces), '--profile-steps', '1',
                   '--out', str(out)])
  report = json.loads(out.read_text())
  assert set(report['profile']) == {'float32', 'lenet5'}
  for label, rows in report['profile'].items():
    assert (traces / label).is_dir(), label
    assert rows and all(row['ms_per_step'] >= 0 for row in rows), label
    assert any(row['kind'] == 'matmul' for row in rows), label
    # Every operation of the step moves memory; each is timed at least once.
    assert sum(row['bytes_accessed'] for row in rows) > 0, label
    assert all(row['calls_per_step'] >= 1 for row in rows), label
  # LeNet-5's parts are its layers, named from the HLO.
  parts = {row['part'] for row in report['profile']['lenet5']}
  assert {'conv1', 'conv2', 'fc1'} <= parts
  printed = capsys.readouterr().out
  assert 'lenet5 step, time per XLA operation' in printed


@pytest.mark.parametrize('backend,cpu_bfloat16,skipped', [
    ('cpu', False, True), ('cpu', True, False), ('cpu', None, False),
    ('gpu', False, False)])
def test_bfloat16_is_not_timed_where_it_is_emulated(backend, cpu_bfloat16,
                                                    skipped):
  machine = {'backend': backend, 'cpu_bfloat16': cpu_bfloat16,
             'cpu_model': 'Some CPU'}
  result = train_step.skipped_precisions(['float32', 'bfloat16'], machine,
                                         emulated_bfloat16=False)
  assert set(result) == ({'bfloat16'} if skipped else set())
  if skipped:
    assert 'no bfloat16 instructions' in result['bfloat16']
  assert not train_step.skipped_precisions(['float32', 'bfloat16'], machine,
                                           emulated_bfloat16=True)
  assert not train_step.skipped_precisions(['float32'], machine, False)


def test_torch_interpreter_from_flag_or_environment(monkeypatch):
  monkeypatch.delenv(train_step.TORCH_PYTHON_VARIABLE, raising=False)
  assert train_step.parse_args([]).torch_python == sys.executable
  monkeypatch.setenv(train_step.TORCH_PYTHON_VARIABLE, '/some/python')
  assert train_step.parse_args([]).torch_python == '/some/python'
  assert train_step.parse_args(['--torch-python', 'python3']
                               ).torch_python == 'python3'


def test_train_step_torch_is_run_with_the_same_settings(tmp_path, capsys):
  """--torch's plumbing, with a stand-in for the PyTorch interpreter."""
  fake_python = tmp_path / 'fake_python'
  fake_python.write_text(textwrap.dedent(f'''\
      #!{sys.executable}
      import json, os, sys
      script, *flags = sys.argv[1:]
      options = dict(zip(flags[::2], flags[1::2]))
      results = {{p: {{'median_step_s': 2.0, 'images_per_s': 1.0}}
                 for p in ('float32', 'bfloat16')}}
      allocator = {{name: os.environ.get(name)
                   for name in ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_')}}
      json.dump({{'script': script, 'options': options, 'results': results,
                  'allocator': allocator}}, open(options['--out'], 'w'))
      print('summary (fake)')
      '''))
  fake_python.chmod(0o755)
  args = argparse.Namespace(torch_python=str(fake_python), batch_size=2,
                            steps=3, warmup=1, threads=2,
                            system_malloc=False)
  report = train_step.run_torch(args, ['float32', 'bfloat16'])
  # PyTorch gets the allocator settings JAX runs with.
  assert report['allocator'] == {'MALLOC_ARENA_MAX': '1',
                                 'MALLOC_MMAP_MAX_': '0'}
  assert report['script'] == str(train_step.TORCH_SCRIPT)
  assert report['options'] == {
      '--batch-size': '2', '--steps': '3', '--warmup': '1',
      '--precision': 'both', '--threads': '2', '--out': report['options'][
          '--out']}
  ratios = train_step.speed_ratios(
      {'float32': {'median_step_s': 1.0}, 'bfloat16': {'median_step_s': 4.0}},
      report)
  assert ratios['float32']['jax_speedup'] == 2.0
  assert ratios['bfloat16']['jax_speedup'] == 0.5
  assert 'summary (fake)' in capsys.readouterr().out


def test_train_step_refuses_torch_with_the_small_model():
  with pytest.raises(SystemExit):
    train_step.parse_args(['--torch', '--small'])


def test_analytic_flops_match_the_paper_model():
  config = common.make_config(batch_size=1)
  # Forward, per image: conv1 2 * 20*20 * 81 * 256 = 16.6 MFLOP, PrimaryCaps
  # 2 * 6*6 * 81*256 * 256 = 382.2 MFLOP, u_hat 2.9, decoder 2.8, routing
  # 1.8; backward twice that but conv1's input gradient: 1.20 GFLOP a step.
  flops = common.capsnet_step_flops(config, 1)
  assert flops == pytest.approx(1.2026e9, rel=1e-3)


def test_conv_methods(tmp_path, capsys):
  from benchmarks import summarize  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'conv_methods.json'
  assert conv_methods.main([
      '--small', '--repeats', '2', '--out', str(out),
      '--shapes', 'LeNet-5 conv2,Efficient-CapsNet conv4']) == 0
  report = json.loads(out.read_text())
  assert [r['name'] for r in report['results']] == [
      'LeNet-5 conv2', 'Efficient-CapsNet conv4']
  for result in report['results']:
    assert result['images_shape'][0] == 2
    for method in ('patches', 'fourier'):
      assert result['timings'][method]['repeats'] == 2
      assert positive(result['timings'][method]['median_s'])
  # What 'auto' picks for these shapes, as tests/test_convolution.py pins it.
  assert [r['auto'] for r in report['results']] == ['patches', 'patches']
  assert report['steps'] == []
  assert 'patches / fourier' in capsys.readouterr().out

  # Whole steps: 'auto' against each method, alternately.
  assert conv_methods.main([
      '--small', '--repeats', '1', '--out', str(out), '--shapes',
      'LeNet-5 conv2', '--methods', 'patches', '--steps', 'lenet5',
      '--step-repeats', '1']) == 0
  steps = json.loads(out.read_text())['steps']
  assert [(r['model'], r['conv_method'], r['repeats']) for r in steps] == [
      ('lenet5', 'auto', 3), ('lenet5', 'patches', 3)]
  assert all(positive(r['median_s']) and r['batch_size'] == 2
             for r in steps)
  table = summarize.conv_method_steps(tmp_path).splitlines()
  assert table[0] == "| step (batch) | 'auto' ms (IQR) | 'patches' ms (IQR) |"
  assert table[2].startswith('| lenet5 (2) | ')
  for flags in (['--shapes', 'conv9'], ['--steps', 'resnet'],
                ['--methods', 'auto']):
    with pytest.raises(SystemExit):
      conv_methods.main(flags)


def test_time_calls_extends_short_calls_to_the_minimum_durations():
  """A call of 2 ms asked for 3 timed calls after 1 warm-up, with 0.05 s
  of warm-up and 0.1 s of timed calls at least: more calls of each."""
  calls = []

  def call():
    time.sleep(0.002)
    calls.append(time.perf_counter())
    return 0

  start = time.perf_counter()
  timing = common.time_calls(call, repeats=3, warmup=1, min_warmup_s=0.05,
                             min_timed_s=0.1)
  assert timing['repeats'] == len(timing['times_s']) > 3
  assert sum(timing['times_s']) >= 0.1
  warmup_calls = len(calls) - timing['repeats']
  assert warmup_calls > 1
  # From before the first call: a loaded machine can make one 2 ms call
  # last far longer.
  assert calls[warmup_calls - 1] - start >= 0.05
  # Without minimums, exactly what was asked for.
  calls.clear()
  timing = common.time_calls(call, repeats=3, warmup=1)
  assert timing['repeats'] == 3 and len(calls) == 4


def test_scripts_run_from_the_command_line():
  for script in ('routing_iterations.py', 'train_step.py', 'conv_methods.py',
                 'steps_in_flight.py'):
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'benchmarks' / script), '--help'],
        capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr
    assert '--out' in process.stdout


def test_summarize_takes_medians_over_runs(tmp_path):
  from benchmarks import summarize  # pylint: disable=g-import-not-at-top

  def report(jax_s, torch_s, **settings):
    return {
        'settings': {'batch_size': 128, 'conv_method': 'auto',
                     'reuse_freed_host_memory': True, **settings},
        'results': {'float32': {'median_step_s': jax_s}},
        'torch': {'results': {'float32': {'median_step_s': torch_s}}},
    }

  for index, (jax_s, torch_s) in enumerate([(1.0, 2.0), (3.0, 2.5),
                                            (2.0, 3.0)]):
    (tmp_path / f'train_step_{index}.json').write_text(
        json.dumps(report(jax_s, torch_s)))
  (tmp_path / 'train_step_patches.json').write_text(json.dumps(
      report(4.0, 2.0, conv_method='patches',
             reuse_freed_host_memory=False)))
  rows = summarize.table(tmp_path).splitlines()[2:]
  assert rows == [
      '| float32 | auto | freed memory reused | 2.00 s (1.00-3.00, 3 runs) '
      '| 64.0 | 2.50 s (2.00-3.00, 3 runs) | 1.25x |',
      '| float32 | patches | glibc default | 4.00 s (1 run) | 32.0 '
      '| 2.00 s (1 run) | 0.50x |',
  ]


def test_summary_names_the_machine_and_the_side_by_side_ratios(tmp_path):
  machine = {'cpu_model': 'Some CPU', 'cpu_flags': ['avx2', 'fma'],
             'cpu_bfloat16': False, 'cpus_usable': 2, 'device_kind': 'cpu',
             'jax': '0.10.2'}
  report = {
      'settings': {'batch_size': 128, 'conv_method': 'auto',
                   'reuse_freed_host_memory': True},
      'results': {'float32': {
          'median_step_s': 0.5, 'matmul': {'flops_per_s': 100e9},
          'flops_executed': 40e9, 'executed_fraction_of_matmul_peak': 0.8,
          'stream': {'bytes_per_s': 25e9}, 'bytes_accessed': 5e9,
          'bytes_at_stream_rate_fraction': 0.4}},
      'torch': {'results': {'float32': {'median_step_s': 2.0}}},
      'speed_ratios': {'float32': {'torch_median_step_s': 2.0,
                                   'jax_speedup': 4.0}},
      'skipped': {'bfloat16': 'no bfloat16 instructions'},
      'experiments': {'lenet5': {
          'image_shape': [28, 28, 1], 'median_step_s': 0.01,
          'images_per_s': 12800.0, 'flops_executed': 1e8,
          'predicted_step_s': 0.005, 'slowdown': 2.0}},
      'evaluation': {'float32': {
          'eval_images_per_s': 600.0, 'train_images_per_s': 200.0,
          'ratios': [2.9, 3.0, 3.2], 'median_ratio': 3.0}},
      'machine': machine}
  (tmp_path / 'train_step_1.json').write_text(json.dumps(report))
  from benchmarks import summarize  # pylint: disable=g-import-not-at-top
  text = summarize.summary(tmp_path)
  assert 'Some CPU; CPU flags: avx2 fma; bfloat16 instructions: False' in text
  assert '| 4.00x |' in text and '| 80% | 25.0 | 5.00 | 40% |' in text
  assert 'bfloat16: not timed' in text
  assert '| lenet5 | 28x28x1 |' in text and '| 2.00 |' in text
  assert ('| train_step_1.json | float32 | 600.0 | 200.0 | 3.00x | 2.90-3.20 '
          '(3 rounds) |') in text
  options_dir = tmp_path / 'options'
  options_dir.mkdir()
  (options_dir / 'xla_options.json').write_text(json.dumps({
      'results': {}, 'machine': machine,
      'compiler_options': {'float32': {'rounds': 7, 'variants': [
          {'label': 'XLA defaults', 'median_step_s': 0.5,
           'median_ratio_to_defaults': 1.0},
          {'label': 'xla_cpu_experimental_ynn_fusion_type=',
           'median_step_s': 0.6, 'median_ratio_to_defaults': 1.2}]}}}))
  text = summarize.summary(options_dir)
  assert ('| xla_options.json | float32 | xla_cpu_experimental_ynn_fusion_'
          'type= | 0.600 | 1.200 (7 rounds) |') in text
  # A run under other XLA flags is a machine of its own.
  flagged = dict(report, machine=dict(
      machine, xla_flags='--xla_cpu_experimental_ynn_fusion_type='))
  (tmp_path / 'train_step_2.json').write_text(json.dumps(flagged))
  lines = summarize.machines(tmp_path).splitlines()
  assert len(lines) == 2
  assert lines[0].endswith('(train_step_1.json)')
  assert lines[1].endswith(
      '; XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= '
      '(train_step_2.json)')


def test_summary_names_the_cpu_family_and_model(tmp_path):
  machine = {'cpu_model': 'Intel(R) Xeon(R) Processor', 'cpu_family': 6,
             'cpu_model_number': 143, 'cpu_stepping': 8,
             'cpu_flags': ['amx_bf16'], 'cpu_bfloat16': True,
             'cpus_usable': 2, 'device_kind': 'cpu', 'jax': '0.10.2'}
  (tmp_path / 'train_step_1.json').write_text(json.dumps(
      {'results': {}, 'machine': machine}))
  from benchmarks import summarize  # pylint: disable=g-import-not-at-top
  assert summarize.machines(tmp_path).startswith(
      '- Intel(R) Xeon(R) Processor (family 6, model 143); CPU flags: '
      'amx_bf16;')


def test_machine_names_the_xla_flags(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  machine = common.machine_info()
  assert machine['xla_flags'] == ''
  assert 'XLA_FLAGS' not in common.describe_machine(machine)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_onednn=true')
  machine = common.machine_info()
  assert machine['xla_flags'] == '--xla_cpu_use_onednn=true'
  assert common.describe_machine(machine).endswith(
      ', XLA_FLAGS=--xla_cpu_use_onednn=true')


def test_evaluation_rounds_are_checked(capsys):
  assert train_step.parse_args(['--evaluation']).evaluation_rounds == 7
  with pytest.raises(SystemExit):
    train_step.parse_args(['--evaluation', '--evaluation-rounds', '0'])
  assert '--evaluation-rounds must be >= 1' in capsys.readouterr().err


def test_compiler_options_are_timed_against_the_defaults(tmp_path, capsys):
  out = tmp_path / 'train_step.json'
  train_step.main(['--precision', 'float32', '--small', '--batch-size', '2',
                   '--steps', '1', '--warmup', '0', '--min-timed-seconds',
                   '0', '--min-warmup-seconds', '0', '--compiler-option',
                   'xla_cpu_experimental_ynn_fusion_type=',
                   '--compiler-option-rounds', '2', '--out', str(out)])
  report = json.loads(out.read_text())
  result = report['compiler_options']['float32']
  assert result['rounds'] == 2
  defaults, without_ynn = result['variants']
  assert defaults['options'] == {} and without_ynn['options'] == {
      'xla_cpu_experimental_ynn_fusion_type': ''}
  for variant in result['variants']:
    assert len(variant['step_s']) == 2 and all(map(positive,
                                                   variant['step_s']))
    assert variant['median_step_s'] == pytest.approx(
        np.median(variant['step_s']))
  assert defaults['median_ratio_to_defaults'] == pytest.approx(1.0)
  assert without_ynn['median_ratio_to_defaults'] == pytest.approx(
      np.median(np.array(without_ynn['step_s'])
                / np.array(defaults['step_s'])))
  assert report['settings']['compiler_options'] == [
      'xla_cpu_experimental_ynn_fusion_type=']
  assert 'XLA compiler options, 2 rounds' in capsys.readouterr().out


def test_compiler_options_are_checked(capsys):
  with pytest.raises(SystemExit):
    train_step.parse_args(['--compiler-option', 'no_equals_sign'])
  assert 'must be NAME=VALUE' in capsys.readouterr().err
  with pytest.raises(SystemExit, match='xla_cpu_experimental_ynn_fusion_'
                     'type=individual_dot: XLA refused it'):
    train_step.main(['--small', '--compiler-option',
                     'xla_cpu_experimental_ynn_fusion_type=individual_dot'])


def test_experiments_are_checked():
  assert train_step.parse_args(['--experiments', 'lenet5,affnist']
                               ).experiments == ['lenet5', 'affnist']
  with pytest.raises(SystemExit):
    train_step.parse_args(['--experiments', 'cifar'])


def test_epoch_breakdown_splits_the_epoch_into_its_phases():
  """benchmarks/epoch.py's arithmetic on a made-up timeline: the epoch runs
  from the second batch to the test, and only the calls inside it count."""
  timeline = epoch.Timeline()
  timeline.batch_times = [0.0, 10.0, 11.0, 12.0]
  timeline.calls = {'evaluate': [(20.0, 3.0), (31.0, 2.0)],  # validation, test
                    'save': [(5.0, 9.0), (24.0, 1.0)],  # the first: before
                    'wait': [(29.0, 0.5), (40.0, 0.1)]}
  timeline.evaluated = [(20.0, 50), (31.0, 100)]
  timeline.test_started = 30.0
  result = epoch.epoch_breakdown(timeline, {'median_s': 4.0,
                                            'images_per_s': 32.0},
                                 steps=4)
  assert result['epoch_s'] == 20.0 and result['steps_s'] == 12.0
  assert result['validation_s'] == 3.0 and result['checkpoint_s'] == 1.5
  assert result['rest_s'] == pytest.approx(3.5)
  assert result['outside_steps_fraction'] == pytest.approx(0.4)
  assert result['eval_images_per_s'] == pytest.approx(50.0)
  # 50 validation examples at 50/s: 1 s of its 3 s, the rest compilation.
  assert result['validation_compile_s'] == pytest.approx(2.0)
  assert result['outside_steps_fraction_compiled'] == pytest.approx(
      1 - 12.0 / 18.0)


def test_epoch_instrumentation_is_removed_afterwards():
  before = (epoch.train_lib.evaluate, epoch.input_pipeline.train_batches,
            epoch.checkpoints.Checkpoints.save)
  with epoch.instrumented(epoch.Timeline()):
    assert epoch.train_lib.evaluate is not before[0]
  assert (epoch.train_lib.evaluate, epoch.input_pipeline.train_batches,
          epoch.checkpoints.Checkpoints.save) == before


def test_epoch_times_bare_steps_around_a_real_epoch(mnist_idx_dir,
                                                    mnist_tfds_dir, tmp_path):
  """benchmarks/epoch.py end to end on a tiny CapsNet and real MNIST: the
  epoch's steps are costed by bare steps timed before and after it."""
  out = tmp_path / 'epoch.json'
  report = epoch.main([
      '--tiny', '--batch-size', '4', '--step-repeats', '1', '--max-steps',
      '3', '--train-examples', '64', '--eval-examples', '32', '--data-dir',
      str(mnist_idx_dir), '--tfds-data-dir', str(mnist_tfds_dir), '--out',
      str(out)])
  assert json.loads(out.read_text())['epoch'] == report['epoch']
  bare, breakdown = report['bare_steps'], report['epoch']
  assert bare['count'] == 3  # the epoch's steps: 1 before, 2 after
  assert positive(bare['before_s']) and positive(bare['after_s'])
  assert breakdown['step_source'] == 'bare steps'
  assert breakdown['step_s'] == pytest.approx(
      (bare['before_s'] + bare['after_s']) / 2)
  assert breakdown['steps_s'] == pytest.approx(2 * breakdown['step_s'])
  assert report['accuracy']['checkpoint_step'] == 3
  assert 0 <= breakdown['validation_compile_s'] <= breakdown['validation_s']
  assert breakdown['outside_steps_fraction_compiled'] <= (
      breakdown['outside_steps_fraction'])
  check_machine(report['machine'])


def test_epoch_bare_steps_flag_is_checked():
  for value in ('0', '-2'):
    with pytest.raises(SystemExit):
      epoch.parse_args(['--bare-steps', value])


def test_steps_in_flight_runs_each_limit_in_its_own_process(tmp_path,
                                                            capsys):
  out = tmp_path / 'in_flight.json'
  report = steps_in_flight.main([
      '--small', '--batch-size', '2', '--steps', '4', '--wait-every', '2',
      '--limits', '3,1', '--pauses-ms', '0,5', '--repeats', '1',
      '--out', str(out)])
  assert json.loads(out.read_text())['results'] == report['results']
  assert [(result['limit'], result['pause_ms'])
          for result in report['results']] == [(3, 0), (1, 0), (3, 5), (1, 5)]
  assert [run['pause_ms'] for result in report['results']
          for run in result['runs']] == [0, 0, 5, 5]
  for result in report['results']:
    (run,) = result['runs']
    assert positive(run['step_s']) and run['step_s'] == result['median_step_s']
    # A process of its own: at least the libraries, not this process's peak.
    assert 0.1 < result['median_peak_resident_gib'] < 64
  assert 'steps in flight at most' in capsys.readouterr().out
  check_machine(report['machine'])
  # By default, the loop's pause.
  assert steps_in_flight.parse_args([]).pauses_ms == [
      host_memory.RELEASE_PAUSE_SECONDS * 1000]
  for flags in (['--limits', '0'], ['--steps', '0'], ['--pauses-ms', '-1'],
                ['--pauses-ms', 'soon'],
                ['--small', '--experiment', 'multimnist'],
                ['--experiment', 'cifar10']):
    with pytest.raises(SystemExit):
      steps_in_flight.parse_args(flags)

