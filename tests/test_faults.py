"""Faults a user meets for real, each made for real: one line on stderr naming the file or flag,
exit code 1 (2 for usage), no traceback, nothing half-written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import clean_data
import cv
import dataset
import models
import predict
import train

from conftest import FAST, ROOT, one_error_line  # noqa: E402




def test_resume_on_another_kind_of_device(tiny_data, tmp_path, interrupt):
    """A last.pt saved on a GPU resumes with --device cpu: its CUDA generator state (16 bytes)
    cannot go into a CPU generator, so the draws are seeded afresh with a warning, and the run
    finishes."""
    out = tmp_path / 'run'
    code, _ = interrupt(['train.py', '--data', tiny_data, *FAST, '--epochs', '3', '--out-dir', out],
                        at='epoch 2/3 step 2/')
    assert code == 130
    # What a CUDA run writes: its device, a 16-byte Philox state for augmentation and for CUDA's
    # RNG.
    last = torch.load(out / 'last.pt', weights_only=True)
    last.update(device_type='cuda', aug_rng=torch.zeros(16, dtype=torch.uint8),
                cuda_rng=torch.zeros(16, dtype=torch.uint8))
    torch.save(last, out / 'last.pt')
    older = tmp_path / 'older'  # the same, from a version that did not record the device
    shutil.copytree(out, older)
    del last['device_type']
    torch.save(last, older / 'last.pt')
    for run, said in ((out, 'last.pt was saved on cuda, this run goes on on cpu'),
                      (older, 'last.pt was saved on another device, this run goes on on cpu')):
        resumed = subprocess.run([sys.executable, 'train.py', '--resume', str(run), '--device',
                                  'cpu'], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert 'Traceback' not in resumed.stderr
        assert said in resumed.stdout and 'resumed at epoch 2' in resumed.stdout
        metrics = json.loads((run / 'metrics.json').read_text())
        assert metrics['epochs_run'] == 3 and np.isfinite(metrics['val_rmse'])


def test_resume_from_a_damaged_last_pt(tiny_data, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last.pt').write_bytes(b'PK\x03\x04 cut short')
    assert train.main(['--resume', str(run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'--resume {run}: {run / "last.pt"} cannot be resumed from' in line


def test_weights_file_of_another_architecture(tiny_data, tmp_path, capsys):
    """A ResNet-18 state dict has resnet50's key names but other shapes: strict=False does not
    forgive that."""
    path = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    code = train.main(['--data', tiny_data, '--out-dir', str(tmp_path / 'run'), *FAST, '--model',
                       'resnet50',
                       '--weights', str(path)])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'--weights {path}: does not fit resnet50' in line and 'size mismatch' in line


def test_predict_checkpoint_that_does_not_fit_its_model(tiny_data, trained, tmp_path, capsys):
    ckpt = torch.load(os.path.join(trained, 'best.pt'), weights_only=True)
    ckpt.update(model_name='resnet50', channels=3)  # a cnn's weights under the other model's name
    bad = tmp_path / 'best.pt'
    torch.save(ckpt, bad)
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', str(bad), '--data', tiny_data, '--out', str(out),
                         '--device', 'cpu']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'{bad}: its weights do not fit a resnet50' in line
    assert not out.exists()


def test_predict_non_integer_id_in_sample_submission(tiny_data, trained, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns('wiki_labeled'))
    ids = list(pd.read_csv(data / 'wiki_judge.csv')['ID'])
    (data / 'sample_submission.csv').write_text(f'ID,age\n{ids[0]},0\n12.5,0\n{ids[1]},0\n')
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', trained, '--data', str(data), '--out', str(out),
                         '--device', 'cpu']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "sample_submission.csv: line 3: ID = '12.5' is not a whole number" in line
    assert not out.exists()


def test_predict_fold_models_without_checkpoint_column(tiny_data, tmp_path, capsys):
    run = tmp_path / 'cv'
    run.mkdir()
    (run / 'fold_models.csv').write_text('fold,val_rmse\n0,9.1\n1,9.3\n')
    assert predict.main(['--checkpoint', str(run), '--data', tiny_data, '--out',
                         str(tmp_path / 's.csv'),
                         '--device', 'cpu']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'fold_models.csv: missing column(s) checkpoint' in line


def test_predict_out_of_memory_suggests_a_batch_size(tiny_data, trained, tmp_path, monkeypatch,
                                                     capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.00 GiB')
    monkeypatch.setattr(models, 'predict_ages', oom)
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out', str(out),
                         '--device', 'cpu',
                         '--batch-size', '64']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'out of GPU memory at --batch-size 64; try --batch-size 32' in line
    assert not out.exists()


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'wrong_rows'])
def test_damaged_image_cache_is_rebuilt(tmp_path, damage):
    root = tmp_path / 'img'
    paths = [f'{i}.png' for i in range(4)]
    root.mkdir()
    for i, p in enumerate(paths):
        dataset.write_atomic(str(root / p), lambda tmp, i=i: dataset.Image.fromarray(
            np.full((100, 100), 40 * i, np.uint8)).save(tmp))
    csv, table = str(tmp_path / 'clean.csv'), pd.DataFrame({'path': paths})
    first, _ = dataset.load_images(csv, table, str(root), log=lambda *a: None)
    cache = dataset.cache_path(csv, paths)
    if damage == 'truncate':
        data = open(cache, 'rb').read()
        open(cache, 'wb').write(data[:len(data) // 2])
    elif damage == 'garbage':
        open(cache, 'wb').write(b'\x00' * 1000)
    else:
        np.savez(cache, images=first[:2], ok=np.ones(2, bool))
    lines = []
    again, ok = dataset.load_images(csv, table, str(root), log=lines.append)
    np.testing.assert_array_equal(again, first)
    assert ok.all()
    assert any(line.startswith('warning: the image cache') and 'decoding the images again' in line
               for line in lines)
    def fail(*a):
        pytest.fail('decoded a third time')
    third, _ = dataset.load_images(csv, table, str(root), log=fail)
    np.testing.assert_array_equal(third, first)  # the rebuilt cache is good again


def test_clean_data_read_error_is_not_called_a_write_error(tiny_data, tmp_path, monkeypatch,
                                                           capsys):
    """A PermissionError while reading wiki_labels.csv (root cannot be denied a read, so the read
    raises it here) is reported as the file that cannot be read."""
    real = pd.read_csv

    def denied(path, *a, **k):
        if str(path).endswith('wiki_labels.csv'):
            raise PermissionError(13, 'Permission denied', str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(pd, 'read_csv', denied)
    assert clean_data.main(['--data', tiny_data, '--out', str(tmp_path / 'c.csv')]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'wiki_labels.csv: cannot read (Permission denied)' in line and 'write' not in line


def test_clean_data_write_error_names_the_output(tiny_data, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    out = blocker / 'clean.csv'
    assert clean_data.main(['--data', tiny_data, '--out', str(out), '--no-image-check']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'cannot write {out}: its folder {blocker} cannot be made' in line


def test_cv_report_names_cells_without_a_result(tiny_data, tmp_path, monkeypatch, capsys):
    """A run whose result.json is missing when the report is written (a torchrun process died, or
    the file went missing): cv.py names it, says what to do, and exits 1."""
    out = tmp_path / 'cv'
    argv = ['--data', tiny_data, *FAST, '--epochs', '1', '--folds', '2', '--out-dir', str(out)]
    assert cv.main(argv) == 0
    gone = out / 'cells' / 'base' / 'fold1' / 'result.json'
    os.remove(gone)
    # as if another process had this run and died
    monkeypatch.setattr(cv, 'run_cell', lambda *a, **k: None)
    capsys.readouterr()
    assert cv.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'1 run(s) have no result: {gone}; run the same command again to train them' in line


def test_ctrl_c_while_decoding_stops_at_once(tiny_data, tmp_path, monkeypatch, capsys,
                                             ctrl_c_raises):
    """Ctrl-C while the images are decoded the first time: out in well under a second, not after
    all images (nor after a training step)."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns('*.npz'))
    real, started = dataset.decode_image, []

    def slow(path, photo=False):
        if not started:  # the first image: press Ctrl-C a moment later
            started.append(time.time())
            threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        time.sleep(0.2)
        return real(path, photo)
    monkeypatch.setattr(dataset, 'decode_image', slow)
    rows = len(pd.read_csv(data / 'wiki_labels_clean.csv'))
    # decoding them all takes longer than the wait below, even on 8 threads
    assert rows * 0.2 / 8 > 2
    code = train.main(['--data', str(data), '--out-dir', str(tmp_path / 'run'), *FAST])
    assert code == 130 and time.time() - started[0] < 1.5
    assert one_error_line(capsys.readouterr().err) == 'error: interrupted'
    assert not any(f.endswith('.npz') for f in os.listdir(data))  # no half-written cache


def test_time_limit_before_the_first_log_step_still_counts_images(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert train.main(['--data', tiny_data, '--out-dir', str(out), *FAST, '--log-every', '1000',
                       '--time-limit', '0.00001']) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['stopped'] == 'time_limit' and metrics['train_img_per_s'] > 0
