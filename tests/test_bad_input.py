"""A user's mistakes, each made for real: one `error:` line naming the file, row or flag, exit code
2 for a flag and 1 for a file or a failed run, no traceback, nothing written or left behind."""
import io
import os
import re
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
from PIL import Image

import bench
import clean_data
import cli
import cv
import dataset
import demo_data
import predict
import train

from conftest import FAST, ROOT, copy_data, one_error_line, usage_error  # noqa: E402


# -------------------------------------------------------------------------------- every number flag

SCRIPTS = {'train.py': train.main, 'cv.py': cv.main, 'clean_data.py': clean_data.main,
           'predict.py': predict.main, 'bench.py': bench.main, 'demo_data.py': demo_data.main}
# The flags whose value is any text (a path, a list of options): every other flag that --help
# shows with a value is a number, or one of the choices --help lists in braces.
TEXT_FLAGS = {'--data', '--csv', '--out-dir', '--resume', '--weights', '--json', '--checkpoint',
              '--images', '--labels', '--out', '--grid', '--framing', '--paste'}
REQUIRED = {'predict.py': ['--checkpoint', 'x', '--data', 'y'], 'clean_data.py': ['--data', 'y']}


def value_flags(main):
    """The flags that `python SCRIPT --help` shows with a value: [(flag, its metavar)]."""
    with pytest.raises(SystemExit):
        main(['--help'])
    return re.findall(r'^  (--[a-z-]+) ([A-Z_{][^ ,]*)', sys.stdout.getvalue(), re.M)


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_number_flag_refuses_nan_inf_and_text_naming_the_flag(script, capsys, monkeypatch):
    """What a user sees for `--lr nan` and the like, for every flag --help lists: a usage error
    (exit 2) whose line names the flag, from every number flag of every script."""
    monkeypatch.setattr(sys, 'stdout', io.StringIO())
    flags = value_flags(SCRIPTS[script])
    monkeypatch.undo()
    numbers = [(f, v) for f, v in flags if f not in TEXT_FLAGS and not v.startswith('{')]
    assert len(numbers) >= {'train.py': 15, 'cv.py': 15}.get(script, 1), flags
    for flag, _ in numbers:
        for bad in ('nan', 'inf', '-inf', 'abc'):
            if bad == '-inf' and 'face-score' in flag:
                continue  # a face-score threshold of -inf keeps every row: a value that works
            with pytest.raises(SystemExit) as e:
                SCRIPTS[script](REQUIRED.get(script, []) + [f'{flag}={bad}'])
            assert e.value.code == 2
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert f'argument {flag}: ' in line and repr(bad) in line, line


def test_clean_data_nan_age_is_a_usage_error_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / 'clean.csv'
    assert "--min-age: 'nan' is not a finite number" in usage_error(
        clean_data.main, ['--data', tiny_data, '--out', str(out), '--min-age', 'nan'], capsys)
    assert "--min-face-score: 'inf' is not a finite number" in usage_error(
        clean_data.main, ['--data', tiny_data, '--out', str(out), '--min-face-score', 'inf'],
        capsys)
    assert not out.exists()


def test_weight_decay_nan_is_a_usage_error(tiny_data, tmp_path, capsys):
    line = usage_error(train.main, ['--data', tiny_data, '--out-dir', str(tmp_path / 'run'), *FAST,
                                    '--weight-decay', 'nan'], capsys)
    assert "--weight-decay: 'nan' is not a finite number" in line
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------- tracebacks

def test_ctrl_c_while_clean_data_decodes(tiny_data, tmp_path, monkeypatch, capsys, ctrl_c_raises):
    """Ctrl-C while the images decode: exit 130, 'error: interrupted', no CSV and no image cache."""
    data = copy_data(tiny_data, tmp_path)
    for f in os.listdir(data):
        if f.startswith('wiki_labels_clean'):
            os.remove(data / f)
    real = dataset.decode_image

    started = threading.Event()

    def slow(path, photo=False):  # the first image decoded presses Ctrl-C, so it lands mid-decoding
        if not started.is_set():
            started.set()
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return real(path, photo)
    monkeypatch.setattr(dataset, 'decode_image', slow)
    try:
        code = clean_data.main(['--data', str(data)])
    except KeyboardInterrupt:
        pytest.fail('Ctrl-C escaped clean_data.py as a KeyboardInterrupt (a traceback for the '
                    'user)')
    assert code == 130
    assert one_error_line(capsys.readouterr().err) == 'error: interrupted'
    assert not [f for f in os.listdir(data) if f.startswith('wiki_labels_clean')]


def test_the_same_grid_value_twice_is_a_usage_error(tiny_data, tmp_path, capsys):
    for grid in ('lr=1e-3,1e-3', 'lr=1e-3,0.001', 'no-augment=true,1'):
        line = usage_error(cv.main, ['--data', tiny_data, *FAST, '--folds', '2', '--grid', grid,
                                     '--out-dir', str(tmp_path / 'cv')], capsys)
        assert 'is given twice' in line and grid in line
    assert not (tmp_path / 'cv').exists()


def test_a_fold_without_validation_rows_stops_before_training(tiny_data, tmp_path, capsys):
    out = tmp_path / 'cv'
    assert cv.main(['--data', tiny_data, *FAST, '--limit', '10', '--folds', '10', '--out-dir',
                    str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'has no test-like row to validate on' in line and 'use fewer --folds' in line
    assert not out.exists()


@pytest.mark.parametrize('edit, said', [
    (lambda c: c.pop('y_mean'), "no 'y_mean' in it"),
    (lambda c: c.pop('model'), "no 'model' in it"),
    (lambda c: c.update(size=7), 'size 7 is outside 32..512 px'),
    (lambda c: c.update(size='64'), "size = '64' is not int"),
    (lambda c: c.update(size=True), 'size = '),
    (lambda c: c.update(y_mean=float('nan')), 'y_mean = '),
    (lambda c: c.update(channels=3), 'channels 3 but a cnn takes 1'),
    (lambda c: c.update(bins=5), 'bins 5 is neither 0'),
    (lambda c: c.update(model_name='vgg'), "unknown model 'vgg'"),
    (lambda c: c.update(model={'w': 'not a tensor'}), 'not a state dict of tensors'),
    (lambda c: c.clear(), "no 'model' in it"),
])
def test_an_edited_checkpoint_is_named_with_its_field(tiny_data, trained, tmp_path, capsys, edit,
                                                      said):
    ckpt = torch.load(os.path.join(trained, 'best.pt'), weights_only=True)
    edit(ckpt)
    bad = tmp_path / 'best.pt'
    torch.save(ckpt, bad)
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', str(bad), '--data', tiny_data, '--out', str(out),
                         '--device', 'cpu']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'{bad}: ' in line and said in line
    assert not out.exists()


def test_a_checkpoint_that_is_not_a_dict(tiny_data, tmp_path, capsys):
    bad = tmp_path / 'best.pt'
    torch.save([torch.zeros(2)], bad)
    assert predict.main(['--checkpoint', str(bad), '--data', tiny_data, '--out',
                         str(tmp_path / 's.csv'),
                         '--device', 'cpu']) == 1
    assert 'not a checkpoint of this project' in one_error_line(capsys.readouterr().err)


@pytest.fixture(scope='module')
def interrupted_run(tiny_data, tmp_path_factory, interrupt):
    """A run stopped by Ctrl-C in its second epoch: a folder with last.pt and no metrics.json."""
    run = tmp_path_factory.mktemp('interrupted') / 'run'
    code, _ = interrupt(['train.py', '--data', tiny_data, *FAST, '--epochs', '3', '--log-every',
                         '1',
                         '--out-dir', run], at='epoch 2/3 step 2/')
    assert code == 130
    return run


@pytest.mark.parametrize('edit, said', [
    (lambda c: c['args'].update(lr='abc'), "--lr: 'abc' is not a number"),
    (lambda c: c['args'].update(model='vgg'), "invalid choice: 'vgg'"),
    (lambda c: c.pop('optimizer'), "no 'optimizer' in it"),
    (lambda c: c.update(state={'epoch': 1, 'oops': 2}), 'does not fit this run'),
])
def test_an_edited_last_pt_is_refused_naming_it(interrupted_run, tmp_path, capsys, edit, said):
    """--resume reads last.pt's saved options as if they were typed again, and checks its fields."""
    run = tmp_path / 'run'
    shutil.copytree(interrupted_run, run)
    last = torch.load(run / 'last.pt', weights_only=True)
    edit(last)
    torch.save(last, run / 'last.pt')
    assert train.main(['--resume', str(run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(run / 'last.pt') in line and said in line
    assert not (run / 'metrics.json').exists()


# ----------------------------------------------------------------------- exit 0 with a wrong result

def test_an_empty_image_folder_is_an_error_that_says_where_it_looked(tiny_data, tmp_path, capsys):
    # unpacked one level wrong: the folder is there, empty
    data = copy_data(tiny_data, tmp_path, images=False)
    out = tmp_path / 'clean.csv'
    assert clean_data.main(['--data', str(data), '--out', str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'no usable rows' in line
    assert str(data / 'wiki_labeled') in line
    assert 'image missing' in line
    assert not out.exists()


def test_clean_data_never_overwrites_its_input(tiny_data, tmp_path, capsys):
    data = copy_data(tiny_data, tmp_path, images=False)
    before = (data / 'wiki_labels.csv').read_bytes()
    for name in ('wiki_labels.csv', 'wiki_judge.csv'):
        line = usage_error(clean_data.main, ['--data', str(data), '--out', str(data / name)],
                           capsys)
        assert f'--out {data / name} is an input of this command' in line
    assert (data / 'wiki_labels.csv').read_bytes() == before


def test_predict_never_overwrites_an_input_image(trained, tmp_path, capsys):
    photo = tmp_path / 'me.png'
    Image.fromarray(demo_data.draw_face(np.random.default_rng(0), 30.0, True)).save(photo)
    before = photo.read_bytes()
    line = usage_error(predict.main,
                       ['--checkpoint', trained, '--images', str(photo), '--out', str(photo),
                                      '--device', 'cpu'], capsys)
    assert 'is an input of this command' in line and photo.read_bytes() == before


# ------------------------------------------------------------------------------ misleading messages

def clean_copy(tiny_data, tmp_path, edit):
    """tiny_data with its clean CSV edited by `edit(table)`: the data folder."""
    data = copy_data(tiny_data, tmp_path)
    csv = data / 'wiki_labels_clean.csv'
    table = pd.read_csv(csv)
    edit(table)
    table.to_csv(csv, index=False)
    return data


@pytest.mark.parametrize('age, said', [('inf', 'is outside 0..1000'), ('1e9', 'is outside 0..1000'),
                                       ('-3', 'is outside 0..1000')])
def test_impossible_ages_in_the_clean_csv_are_named(tiny_data, tmp_path, capsys, age, said):
    def edit(table):
        table['age'] = table['age'].astype(object)
        table.loc[0, 'age'] = age
    data = clean_copy(tiny_data, tmp_path, edit)
    run = tmp_path / 'run'
    assert train.main(['--data', str(data), '--out-dir', str(run), *FAST]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'wiki_labels_clean.csv: line 2: age' in line and said in line
    assert not run.exists()


def test_a_loss_that_diverges_at_once_says_no_checkpoint_was_saved(tiny_data, tmp_path, monkeypatch,
                                                                   capsys):
    class NaNLoss(torch.nn.SmoothL1Loss):
        def forward(self, out, y):
            return super().forward(out, y) * float('nan')
    monkeypatch.setitem(train.models.LOSSES, 'smoothl1', NaNLoss)
    run = tmp_path / 'run'
    assert train.main(['--data', tiny_data, '--out-dir', str(run), *FAST, '--loss',
                       'smoothl1']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'the loss became NaN/inf at epoch 1' in line and 'no checkpoint was saved' in line
    assert not run.exists()  # nothing was written: no empty run folder either


def test_training_filters_that_leave_nothing_name_themselves(tiny_data, tmp_path, capsys):
    run = tmp_path / 'run'
    assert train.main(['--data', tiny_data, '--out-dir', str(run), *FAST, '--train-min-age',
                       '200']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'pass the training filters' in line
    assert 'age outside 200..inf' in line
    assert '--train-min-age' in line
    assert not run.exists()
    out = tmp_path / 'cv'
    assert cv.main(['--data', tiny_data, *FAST, '--folds', '2', '--train-min-age', '200',
                    '--out-dir', str(out)]) == 1
    assert "fold 0's training part" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_clean_csv_whose_paths_are_all_wrong(tiny_data, tmp_path, capsys):
    def edit(table):
        table['path'] = 'elsewhere/' + table['path']
    data = clean_copy(tiny_data, tmp_path, edit)
    for f in os.listdir(data):
        if f.endswith('.npz'):
            os.remove(data / f)
    assert train.main(['--data', str(data), '--out-dir', str(tmp_path / 'run'), *FAST]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'none of the' in line and 'can be read in' in line and 'another --data folder' in line


def test_a_row_with_a_field_too_many_is_one_line(tiny_data, tmp_path, capsys):
    data = copy_data(tiny_data, tmp_path, images=False)
    lines = (data / 'wiki_labels.csv').read_text(encoding='utf-8').splitlines(keepends=True)
    lines[4] = lines[4].rstrip('\n') + ',extra\n'
    (data / 'wiki_labels.csv').write_text(''.join(lines), encoding='utf-8')
    assert clean_data.main(['--data', str(data), '--out', str(tmp_path / 'c.csv')]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'wiki_labels.csv: line 5 has 12 of 11 fields (a comma too many?)' in line


def test_a_decompression_bomb_is_an_unreadable_row_without_pillow_warnings(tiny_data, tmp_path):
    """10000x10000 pixels is over Pillow's warning limit (89 million) and under its error limit."""
    data = copy_data(tiny_data, tmp_path)
    table = dataset.read_labels(str(data / 'wiki_labels.csv'))
    victim = table['path'][0]
    Image.new('L', (10000, 10000)).save(data / 'wiki_labeled' / 'wiki_labeled' / victim)
    proc = subprocess.run([sys.executable, 'clean_data.py', '--data', str(data), '--out',
                           str(tmp_path / 'c.csv')],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ''  # no DecompressionBombWarning from inside Pillow
    # listed as unreadable, by its row
    assert 'a decompression bomb?' in proc.stdout and victim in proc.stdout
    assert victim not in set(pd.read_csv(tmp_path / 'c.csv')['path'])


# ----------------------------------------------------------------------------- files left behind

@pytest.mark.parametrize('labels', ['name,years\nx.png,3\n', 'file,age\nx.png,thirty\n', None])
def test_bad_labels_leave_no_predictions_csv(trained, tmp_path, capsys, labels):
    photo = tmp_path / 'faces' / 'x.png'
    photo.parent.mkdir()
    Image.fromarray(demo_data.draw_face(np.random.default_rng(0), 30.0, True)).save(photo)
    path = tmp_path / 'labels.csv'
    if labels is not None:
        path.write_text(labels)
    out = tmp_path / 'P.csv'
    assert predict.main(['--checkpoint', trained, '--images', str(photo.parent), '--labels',
                         str(path),
                         '--out', str(out), '--device', 'cpu']) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line
    assert not out.exists() and not (tmp_path / 'P_vs_actual.png').exists()


def test_labels_that_match_no_image_leave_no_predictions_csv(trained, tmp_path, capsys):
    photo = tmp_path / 'faces' / 'x.png'
    photo.parent.mkdir()
    Image.fromarray(demo_data.draw_face(np.random.default_rng(0), 30.0, True)).save(photo)
    (tmp_path / 'labels.csv').write_text('file,age\nother.png,30\n')
    out = tmp_path / 'P.csv'
    assert predict.main(['--checkpoint', trained, '--images', str(photo.parent), '--labels',
                         str(tmp_path / 'labels.csv'), '--out', str(out), '--device', 'cpu']) == 1
    assert 'none of its files is among the images read' in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_failed_cv_run_leaves_nothing_and_the_corrected_command_runs(tiny_data, tmp_path, capsys):
    out = tmp_path / 'cv'
    assert cv.main(['--data', tiny_data, *FAST, '--limit', '20', '--folds', '50', '--out-dir',
                    str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert '50 folds but only 19 people; use fewer --folds' in line
    assert not out.exists()
    assert cv.main(['--data', tiny_data, *FAST, '--csv', str(tmp_path / 'nope.csv'), '--folds', '2',
                    '--out-dir', str(out)]) == 1
    assert 'nope.csv not found' in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert cv.main(['--data', tiny_data, *FAST, '--folds', '2', '--out-dir', str(out)]) == 0
    assert (out / 'summary.csv').exists()


def test_a_cv_folder_without_results_is_free_for_another_command(tiny_data, tmp_path, monkeypatch):
    """A run that failed inside its first fold (out of memory, say) leaves nothing behind (no
    config.json, folds.csv or empty fold folder): a command with other options may take it."""
    out = tmp_path / 'cv'

    def oom(*a, **k):
        raise torch.OutOfMemoryError('CUDA out of memory')
    monkeypatch.setattr(train, 'fit', oom)
    assert cv.main(['--data', tiny_data, *FAST, '--folds', '2', '--out-dir', str(out)]) == 1
    assert not out.exists()
    monkeypatch.undo()
    assert cv.main(['--data', tiny_data, *FAST, '--batch-size', '8', '--folds', '2', '--out-dir',
                    str(out)]) == 0


def test_a_failed_train_run_leaves_no_dated_folder(tmp_path, monkeypatch):
    """No --out-dir: the default runs/MODEL-LOSS-DATE-TIME is made only once the data is loaded."""
    monkeypatch.chdir(tmp_path)
    assert train.main(['--data', str(tmp_path / 'absent'), *FAST]) == 1
    assert train.main(['--data', str(tmp_path), *FAST]) == 1
    assert not (tmp_path / 'runs').exists() or os.listdir(tmp_path / 'runs') == []


# ----------------------------------------------------------------------------- choices

def test_duplicate_ids_are_refused_with_both_lines(tiny_data, tmp_path, capsys):
    data = copy_data(tiny_data, tmp_path, images=False)
    lines = (data / 'wiki_labels.csv').read_text(encoding='utf-8').splitlines(keepends=True)
    first_id = lines[1].split(',')[0]
    lines[6] = first_id + lines[6][lines[6].index(','):]
    (data / 'wiki_labels.csv').write_text(''.join(lines), encoding='utf-8')
    out = tmp_path / 'c.csv'
    assert clean_data.main(['--data', str(data), '--out', str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'wiki_labels.csv: line 7: ID {first_id} is on line 2 too' in line
    assert not out.exists()


def test_a_path_outside_the_image_folder_is_never_opened(tiny_data, tmp_path, capsys, monkeypatch):
    """An absolute full_path pointed at a test image: clean_data removes the row (counted, listed)
    without opening the file; a clean CSV that holds such a path is refused."""
    data = copy_data(tiny_data, tmp_path)
    judge_image = sorted((data / 'wiki_judge_images' / 'wiki_judge_images').iterdir())[0]
    text = (data / 'wiki_labels.csv').read_text(encoding='utf-8')
    table = dataset.read_labels(str(data / 'wiki_labels.csv'))
    text = text.replace(table['path'][0], str(judge_image)).replace(table['path'][1],
                                                                    '../../wiki_judge.csv')
    (data / 'wiki_labels.csv').write_text(text, encoding='utf-8')
    opened, real = [], dataset.decode_image
    monkeypatch.setattr(dataset, 'decode_image', lambda path,
                        photo=False: opened.append(path) or real(path, photo))
    assert clean_data.main(['--data', str(data), '--out', str(tmp_path / 'c.csv')]) == 0
    printed = capsys.readouterr().out
    assert '2 image(s) with a path outside the image folder' in printed
    assert not any(str(judge_image) == p or p.endswith('wiki_judge.csv') for p in opened)
    assert str(judge_image) not in set(pd.read_csv(tmp_path / 'c.csv')['path'])
    edited = pd.read_csv(tmp_path / 'c.csv')
    edited.loc[3, 'path'] = str(judge_image)
    edited.to_csv(tmp_path / 'c.csv', index=False)
    assert train.main(['--data', str(data), '--csv', str(tmp_path / 'c.csv'), '--out-dir',
                       str(tmp_path / 'r'),
                       *FAST]) == 1
    assert 'c.csv: line 5: path' in one_error_line(capsys.readouterr().err)


def test_an_error_message_is_printed_as_one_line(capsys):
    """pandas' and torch's messages can carry newlines: what reaches stderr is one line."""
    cli.error(dataset.DataError('x.csv: cannot parse as CSV (Error tokenizing data.\nC error: '
                                'Expected 11 fields)'))
    assert capsys.readouterr().err == ('error: x.csv: cannot parse as CSV (Error tokenizing data. '
                                       'C error: Expected 11 fields)\n')
