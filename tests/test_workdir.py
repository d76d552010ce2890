"""train/workdir.py: a run's folder, its lock and its config identity."""

import json
import os
import subprocess
import sys

import pytest

from train import workdir as workdir_lib
from train.configs import default


def test_prepare_creates_and_refuses_a_file(tmp_path):
  path = workdir_lib.prepare(tmp_path / 'new' / 'run')
  assert path.is_dir() and path.is_absolute()
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(workdir_lib.WorkdirError, match='not a folder'):
    workdir_lib.prepare(tmp_path / 'a_file')


def test_read_only_workdir_is_refused(tmp_path):
  folder = tmp_path / 'read_only'
  folder.mkdir()
  if os.geteuid() != 0:
    folder.chmod(0o555)
  elif subprocess.run(['chattr', '+i', str(folder)],
                      capture_output=True).returncode != 0:
    pytest.skip('root, and no chattr +i here: nothing is read-only to root')
  try:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f'--workdir={folder}: not writable'):
      workdir_lib.prepare(folder)
  finally:
    if os.geteuid() == 0:
      subprocess.run(['chattr', '-i', str(folder)], check=True)
    else:
      folder.chmod(0o755)


def test_lock_is_exclusive_across_processes_and_released_by_death(tmp_path):
  lock = workdir_lib.Lock(tmp_path)
  assert (tmp_path / '.lock').read_text().strip() == str(os.getpid())
  script = ('import sys; from pathlib import Path; '
            'from train import workdir; workdir.Lock(Path(sys.argv[1]))')
  other = subprocess.run([sys.executable, '-c', script, str(tmp_path)],
                         capture_output=True, text=True, check=False)
  assert other.returncode != 0
  assert f'in use by another run (pid {os.getpid()})' in other.stderr
  lock.release()
  # A holder killed with SIGKILL leaves no stale lock.
  holder = subprocess.Popen(
      [sys.executable, '-c', script + '; print("locked", flush=True); '
       'import time; time.sleep(60)', str(tmp_path)], stdout=subprocess.PIPE,
      text=True)
  assert holder.stdout.readline().strip() == 'locked'
  holder.kill()
  holder.wait()
  workdir_lib.Lock(tmp_path).release()


def test_config_changes_name_each_field(tmp_path):
  config = default.get_config()
  workdir_lib.save_config(tmp_path, config)
  workdir = tmp_path
  assert workdir_lib.check_config(workdir, config, default.get_config()) == {}

  changed = default.get_config()
  changed.model.routing_iterations = 1  # Through the shortcut field too.
  changed.learning_rate = 0.01
  changed.max_steps = 10  # Changeable.
  with pytest.raises(workdir_lib.WorkdirError) as error:
    workdir_lib.check_config(workdir, changed, default.get_config())
  message = str(error.value)
  assert 'model.routing_iterations 3 -> 1' in message
  assert 'learning_rate 0.001 -> 0.01' in message
  assert 'max_steps' not in message and "'routing_iterations" not in message
  changes = workdir_lib.check_config(workdir, changed, default.get_config(),
                                     allow_changes=True)
  assert changes == {'learning_rate': (0.001, 0.01),
                     'max_steps': (-1, 10),
                     'model.routing_iterations': (3, 1)}


def test_changeable_fields_resume_and_new_fields_take_their_default(tmp_path):
  saved = workdir_lib.as_json(default.get_config())
  del saved['model']['conv_method']  # A workdir from before the field.
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = default.get_config()
  config.num_epochs = 80
  config.checkpoint_every_steps = 100
  assert workdir_lib.check_config(tmp_path, config, default.get_config()) == {
      'checkpoint_every_steps': (500, 100), 'num_epochs': (50, 80)}


def test_saved_config_is_strict_json(tmp_path):
  config = default.get_config()
  config.learning_rate = float('nan')
  with pytest.raises(ValueError):
    workdir_lib.save_config(tmp_path, config)
