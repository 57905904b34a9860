"""Faults a shared lab machine produces, each made for real or as torch reports it: a full disk
mid-save, outputs that are devices or pipes, two runs into one folder, kill -9 leftovers, photos
beyond Pillow's pixel limit. One line on stderr, the right exit code, nothing half-written and
nothing left that blocks the next command."""
import os
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cv
import dataset
import predict
import train
from conftest import FAST, ROOT, one_error_line

TORCH_FULL_DISK = '[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534'


def full_disk_at(monkeypatch, name):
    """torch.save fails as it does on a full disk (a RuntimeError, not an OSError) for files whose
    name starts with `name`, after writing part of them; the disk then reports no free space."""
    real_save, real_usage = torch.save, dataset.shutil.disk_usage

    def save(obj, f, *a, **k):
        target = f if isinstance(f, str) else f.name
        if os.path.basename(target).startswith(name):
            (open(target, 'wb') if isinstance(f, str) else f).write(b'half a checkpoint')
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    monkeypatch.setattr(dataset.shutil, 'disk_usage',
                        lambda p: real_usage(p)._replace(free=0))


def temp_files(folder):
    return [n for _, _, names in os.walk(folder) for n in names if '.tmp' in n]


def test_a_full_disk_at_last_pt_says_what_is_kept_and_what_runs_next(tiny_data, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / 'run'
    full_disk_at(monkeypatch, 'last')
    assert train.main(['--data', tiny_data, '--out-dir', str(out), *FAST]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'cannot write {out}/last.pt (No space left on device)' in line
    assert 'best.pt of epoch 1 is intact' in line
    assert f'choose a new --out-dir, such as {out}-2' in line  # nothing to resume from
    assert temp_files(out) == [] and not (out / 'last.pt').exists()
    predict.load_model(str(out / 'best.pt'), torch.device('cpu'))  # the kept one works
    monkeypatch.undo()
    assert train.main(['--data', tiny_data, '--out-dir', f'{out}-2', *FAST]) == 0  # and that does


def test_a_full_disk_at_the_first_best_pt_leaves_no_folder_and_the_same_command_runs(
        tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    argv = ['--data', tiny_data, '--out-dir', str(out), *FAST]
    full_disk_at(monkeypatch, 'best')
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'cannot write {out}/best.pt (No space left on device)' in line
    assert line.endswith('no best.pt was saved; once there is space, run the same command again')
    assert not out.exists()
    monkeypatch.undo()
    assert train.main(argv) == 0


def test_resume_where_no_run_is_offers_to_start_one_there(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    for folder in (tmp_path / 'empty', tmp_path / 'absent'):
        with pytest.raises(SystemExit) as e:
            train.main(['--resume', str(folder)])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().endswith(
            f'--resume {folder}: no run is there to continue; start one with --out-dir {folder}')


def test_a_full_disk_at_best_pt_after_a_last_pt_offers_resume(tiny_data, tmp_path, monkeypatch,
                                                               capsys, interrupt):
    out = tmp_path / 'run'
    code, _ = interrupt(['train.py', '--data', tiny_data, *FAST, '--epochs', '3', '--out-dir',
                         out], at='epoch 2/3 step 2/')
    assert code == 130
    full_disk_at(monkeypatch, 'best')
    assert train.main(['--resume', str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'cannot write {out}/best.pt (No space left on device)' in line
    assert f'continue it with --resume {out}' in line and 'last.pt holds the run' in line
    assert temp_files(out) == []
    monkeypatch.undo()
    assert train.main(['--resume', str(out)]) == 0


def test_a_full_disk_in_cv_leaves_nothing_that_blocks_the_same_command(tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / 'cv'
    argv = ['--data', tiny_data, '--out-dir', str(out), *FAST, '--folds', '2']
    full_disk_at(monkeypatch, 'best')
    assert cv.main(argv) == 1
    assert 'No space left on device' in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # no config.json, folds.csv or empty fold folder: nothing was done
    monkeypatch.undo()
    assert cv.main(argv) == 0


def test_an_output_that_is_a_pipe_is_written_into_not_replaced(tiny_data, trained, tmp_path):
    fifo = tmp_path / 'pipe'
    os.mkfifo(fifo)
    received = reading(fifo)
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out', str(fifo),
                         '--device', 'cpu']) == 0
    for _ in range(600):
        if received:
            break
        time.sleep(0.1)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the pipe, not a file renamed over it
    assert received[0].startswith('ID,age\n') and len(received[0].splitlines()) == 21
    assert os.listdir(tmp_path) == ['pipe']


def reading(fifo):
    """A reader of the pipe `fifo` (what the shell puts behind `--out >(...)`): its text, once
    the writer closes it, in the list returned."""
    received = []
    threading.Thread(target=lambda: received.append(open(fifo).read()), daemon=True).start()
    return received


def test_labels_onto_a_pipe_score_without_plots_beside_it(tiny_data, trained, tmp_path, capsys):
    os.mkfifo(tmp_path / 'pipe')
    reading(tmp_path / 'pipe')
    answers = os.path.join(tiny_data, 'demo_judge_answers.csv')
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--labels', answers,
                         '--out', str(tmp_path / 'pipe'), '--device', 'cpu']) == 0
    printed = capsys.readouterr().out
    assert 'RMSE ' in printed and f'no plots: --out {tmp_path}/pipe is not a file' in printed
    assert os.listdir(tmp_path) == ['pipe']


def test_a_device_that_is_full_ends_in_one_line(tiny_data, trained, tmp_path, monkeypatch, capsys):
    """As `--out /dev/full` does: the write into the device fails with ENOSPC."""
    os.mkfifo(tmp_path / 'pipe')

    def full(*a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(pd.DataFrame, 'to_csv', full)
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out',
                         str(tmp_path / 'pipe'), '--device', 'cpu']) == 1
    err = capsys.readouterr().err.strip().splitlines()  # after the tiny model's collapse warning
    assert err[-1] == f'error: cannot write {tmp_path}/pipe (No space left on device)'
    assert stat.S_ISFIFO(os.stat(tmp_path / 'pipe').st_mode)


def test_the_atomic_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """As SQLite and git write: the new file's data is flushed (fsync) before it replaces the old
    one, so that a power cut leaves the old file or the new one, never an empty one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append('fsync') or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append('replace') or real_replace(a, b))
    dataset.write_json({'a': 1}, tmp_path / 'x.json')
    assert events[:2] == ['fsync', 'replace']


def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_temp_files_of_dead_processes_go_with_the_next_write(tmp_path):
    dead = [tmp_path / f'last.tmp{dead_pid()}.pt', tmp_path / f'clean.tmp{dead_pid()}.csv']
    alive = tmp_path / f'best.tmp{os.getpid()}.pt'  # a running process is still writing it
    for path in (*dead, alive):
        path.write_bytes(b'')
    dataset.write_csv(pd.DataFrame({'a': [1]}), tmp_path / 'history.csv')
    assert sorted(os.listdir(tmp_path)) == sorted(['history.csv', alive.name])


def start_training(tiny_data, out):
    """A train.py run in its own process, returned once its first epoch (and last.pt) is done."""
    proc = subprocess.Popen([sys.executable, 'train.py', '--data', tiny_data, '--out-dir', out,
                             *FAST, '--epochs', '1000'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('epoch 2/'):
            return proc
    raise AssertionError('the first run did not start')


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    first = start_training(tiny_data, out)
    try:
        for script in ('train.py', 'cv.py'):  # two terminals, or an SSH command sent twice
            second = subprocess.run([sys.executable, script, '--data', tiny_data, '--out-dir',
                                     out, *FAST], cwd=ROOT, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 1
            assert one_error_line(second.stderr) == \
                f'error: {out} is in use by another run (PID {first.pid}); wait for it to end, ' \
                'or choose another folder'
    finally:
        first.kill()  # kill -9: it cleans up nothing
        first.wait()
    assert os.path.exists(os.path.join(out, 'run.lock'))  # left behind, but no one holds it
    assert train.main(['--resume', out, '--time-limit', '0.02']) == 0


def test_a_run_killed_before_its_first_last_pt_offers_a_command_that_runs(tiny_data, trained,
                                                                          tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'best.pt').write_bytes(open(os.path.join(trained, 'best.pt'), 'rb').read())
    (out / 'run.lock').write_text(f'{dead_pid()}\n')
    for argv in (['--data', tiny_data, '--out-dir', str(out), *FAST], ['--resume', str(out)]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().endswith(
            f'it cannot be resumed (no last.pt): choose a new --out-dir, such as {out}-2')
    assert train.main(['--data', tiny_data, '--out-dir', f'{out}-2', *FAST]) == 0


def test_a_photo_beyond_pillows_pixel_limit_is_predicted_when_it_is_a_jpeg(trained, tmp_path,
                                                                           capsys):
    big = tmp_path / 'big.jpg'
    Image.fromarray(np.full((12000, 12000), 128, np.uint8)).save(big, quality=50)
    Image.new('L', (10000, 10000)).save(tmp_path / 'big.png')
    out = tmp_path / 'ages.csv'
    assert predict.main(['--checkpoint', trained, '--images', str(big), str(tmp_path / 'big.png'),
                         '--out', str(out), '--device', 'cpu']) == 0
    assert list(pd.read_csv(out)['path']) == [str(big)]
    printed = capsys.readouterr()
    assert '10000x10000 is 100 million pixels, more than the 89 million this decodes' in \
        printed.out
    image, note = dataset.decode_image(str(big), photo=True)
    assert image.shape == (100, 100) and 'decoded at 1/2 of 12000x12000' in note
