"""cv.py: folds, grid expansion, summary numbers, a tiny CV run, resuming and predicting from it."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import cv
import models
import predict

from conftest import FAST, ROOT  # noqa: E402


def test_grid_expands_every_combination_with_types():
    parser = cv.build_parser()
    combos = cv.parse_grid(parser, ['lr=1e-3,3e-4', 'loss=mse,smoothl1', 'no-augment=true,false'])
    assert len(combos) == 8
    assert {c['lr'] for c in combos} == {1e-3, 3e-4}
    assert all(isinstance(c['lr'], float) for c in combos)
    assert {c['loss'] for c in combos} == {'mse', 'smoothl1'}
    assert {c['no_augment'] for c in combos} == {True, False}
    assert len({cv.combo_name(c) for c in combos}) == 8  # one folder each
    assert cv.parse_grid(parser, []) == [{}] and cv.combo_name({}) == 'base'
    assert cv.parse_grid(parser, ['batch_size=64,128']) == [{'batch_size': 64}, {'batch_size': 128}]


@pytest.mark.parametrize('item',
                         ['lr=abc', 'loss=huber', 'folds=3,5', 'nonsense=1', 'lr',
                          'no_augment=maybe', 'model=cnn,resnet50'])
def test_bad_grid_items_are_usage_errors(item):
    with pytest.raises(SystemExit) as e:
        cv.parse_grid(cv.build_parser(), [item])
    assert e.value.code == 2


def test_summary_mean_and_std_match_numpy():
    rng = np.random.default_rng(0)
    results = pd.DataFrame({'combination': ['a'] * 5 + ['b'] * 5, 'rmse': rng.uniform(5, 10, 10),
                            'mae': rng.uniform(3, 8, 10), 'r2': rng.uniform(0, 1, 10),
                            'seconds': 1.0})
    summary = cv.summarize(results).set_index('combination')
    for name in ('a', 'b'):
        part = results[results['combination'] == name]
        for m in ('rmse', 'mae', 'r2'):
            assert summary.loc[name, f'{m}_mean'] == pytest.approx(np.mean(part[m]))
            assert summary.loc[name, f'{m}_std'] == pytest.approx(np.std(part[m], ddof=1))
    assert list(cv.summarize(results)['rmse_mean']) == sorted(summary['rmse_mean'])


@pytest.fixture(scope='module')
def cv_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('cv') / 'run')
    argv = ['--data', tiny_data, *FAST, '--folds', '3', '--grid', 'lr=1e-3,3e-3', '--out-dir', out]
    assert cv.main(argv) == 0
    return out, argv


def test_cv_writes_folds_results_summary_and_oof(cv_run, tiny_data):
    out, _ = cv_run
    clean = pd.read_csv(os.path.join(tiny_data, 'wiki_labels_clean.csv'))
    folds = pd.read_csv(os.path.join(out, 'folds.csv'))
    assert list(folds.columns) == ['ID', 'person', 'fold'] and len(folds) == len(clean)
    assert folds.groupby('person')['fold'].nunique().max() == 1  # no person in two folds
    results = pd.read_csv(os.path.join(out, 'results.csv'))
    assert len(results) == 6 and set(results['fold']) == {0, 1, 2}
    for col in ('lr', 'rmse', 'mae', 'r2', 'best_epoch', 'img_per_s', 'seconds'):
        assert results[col].notna().all()
    summary = pd.read_csv(os.path.join(out, 'summary.csv'))
    assert len(summary) == 2 and summary['rmse_mean'].is_monotonic_increasing
    oof = pd.read_csv(os.path.join(out, 'oof_predictions.csv'))
    test_like = clean[np.isfinite(clean['face_score'])]['ID']
    # every test-like row predicted once, by the fold that held it out
    assert sorted(oof['ID']) == sorted(test_like)
    assigned = folds.set_index('ID')['fold'].loc[oof['ID']].to_numpy()
    assert (oof.set_index('ID')['fold'] == assigned).all()
    best = summary['combination'][0]
    best_rows = results[results['combination'] == best]
    assert summary['rmse_mean'][0] == pytest.approx(best_rows['rmse'].mean())
    for k, part in oof.groupby('fold'):  # each fold's score comes from its out-of-fold predictions
        rmse = np.sqrt(np.mean((part['prediction'] - part['age']) ** 2))
        assert rmse == pytest.approx(best_rows.set_index('fold').loc[k, 'rmse'], rel=1e-4)
    for png in ('predictions.png', 'error_by_decade.png'):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_only_the_best_combinations_fold_models_are_kept(cv_run):
    out, _ = cv_run
    models = pd.read_csv(os.path.join(out, 'fold_models.csv'))
    assert list(models['fold']) == [0, 1, 2]
    assert all(os.path.exists(os.path.join(out, p)) for p in models['checkpoint'])
    kept = {os.path.relpath(os.path.join(d, f), out) for d, _,
            fs in os.walk(out) for f in fs if f == 'best.pt'}
    assert kept == set(models['checkpoint'])


def test_predict_averages_the_cv_fold_models(cv_run, tiny_data, tmp_path, capsys):
    """The submission from a CV run is the mean of what each fold model predicts on its own."""
    out, _ = cv_run
    sub = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', out, '--data', tiny_data, '--out', str(sub), '--device',
                         'cpu']) == 0
    assert '3 model(s)' in capsys.readouterr().out
    checkpoints = pd.read_csv(os.path.join(out, 'fold_models.csv'))['checkpoint']
    singles = []
    for k, ckpt in enumerate(checkpoints):
        one = tmp_path / f'fold{k}.csv'
        assert predict.main(['--checkpoint', os.path.join(out, ckpt), '--data', tiny_data, '--out',
                             str(one),
                             '--device', 'cpu']) == 0
        singles.append(pd.read_csv(one)['age'].to_numpy())
    ensemble = pd.read_csv(sub)
    judge = pd.read_csv(os.path.join(tiny_data, 'wiki_judge.csv'))
    assert list(ensemble['ID']) == sorted(judge['ID'])
    # the fold models differ, so the mean is a real test
    assert np.abs(singles[0] - singles[1]).max() > 0.1
    # 4 decimals in the CSVs
    np.testing.assert_allclose(ensemble['age'], np.mean(singles, axis=0), atol=2e-4)


def test_rerun_skips_every_finished_cell(cv_run, capsys):
    out, argv = cv_run
    before = pd.read_csv(os.path.join(out, 'results.csv'))
    capsys.readouterr()
    assert cv.main(argv) == 0
    assert capsys.readouterr().out.count('done before, skipped') == 6
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(out, 'results.csv')), before)


def test_resume_continues_an_interrupted_cell_from_its_last_checkpoint(tiny_data, tmp_path,
                                                                       interrupt):
    """Ctrl-C in the middle of the second fold, then the same command: the first fold is skipped,
    the second continues from its last.pt, and the numbers equal an uninterrupted CV run."""
    argv = [*FAST, '--epochs', '3', '--log-every', '1', '--folds', '2']
    assert cv.main(['--data', tiny_data, *argv, '--out-dir', str(tmp_path / 'straight')]) == 0
    command = [sys.executable, 'cv.py', '--data', tiny_data, *argv, '--out-dir',
               str(tmp_path / 'cut')]
    code, _ = interrupt(command[1:], at='[2/2] epoch 2/3 step 2/')
    assert code == 130
    fold1 = tmp_path / 'cut' / 'cells' / 'base' / 'fold1'
    assert os.path.exists(fold1 / 'last.pt') and not os.path.exists(fold1 / 'result.json')
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count('done before, skipped') == 1
    assert ('resumed at epoch 2 step 2' in again.stdout
            or 'resumed at epoch 2 step 3' in again.stdout)
    straight = pd.read_csv(tmp_path / 'straight' / 'results.csv')
    cut = pd.read_csv(tmp_path / 'cut' / 'results.csv')
    for col in ('rmse', 'mae', 'r2', 'best_epoch'):
        np.testing.assert_array_equal(cut[col], straight[col])
    history = {name: pd.read_csv(tmp_path / name / 'cells' / 'base' / 'fold1' / 'history.csv')
               for name in ('straight', 'cut')}
    np.testing.assert_array_equal(history['cut']['val_rmse'], history['straight']['val_rmse'])


def test_other_options_in_the_same_directory_are_refused(cv_run, capsys):
    out, argv = cv_run
    with pytest.raises(SystemExit) as e:
        cv.main(argv + ['--epochs', '3'])
    assert e.value.code == 2
    assert 'holds a CV run with other options' in capsys.readouterr().err


def test_folds_below_two_is_a_usage_error(tiny_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        cv.main(['--data', tiny_data, *FAST, '--folds', '1', '--out-dir', str(tmp_path / 'x')])
    assert e.value.code == 2


def test_training_filters_never_touch_the_validation_fold(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    assert cv.main(['--data', tiny_data, *FAST, '--epochs', '1', '--folds', '2', '--out-dir', out,
                    '--balance-gender', '--train-max-age', '25']) == 0
    clean = pd.read_csv(os.path.join(tiny_data, 'wiki_labels_clean.csv'))
    oof = pd.read_csv(os.path.join(out, 'oof_predictions.csv'))
    test_like = clean[np.isfinite(clean['face_score'])]
    assert sorted(oof['ID']) == sorted(test_like['ID'])  # rows over 25 are still scored
    for k in (0, 1):
        with open(os.path.join(out, 'cells', 'base', f'fold{k}', 'result.json')) as f:
            r = json.load(f)
        fold_rows = pd.read_csv(os.path.join(out, 'folds.csv')).query('fold != @k')['ID']
        rows = clean.set_index('ID').loc[fold_rows]
        # the default training filters
        trainable = (rows['face_score'] >= 1) & rows['second_face_score'].isna()
        assert r['n_train'] == int((trainable & (rows['age'] <= 25)).sum())
        # the zero-skill line: those training rows' mean age, scored on the fold's test-like rows
        val_ages = oof[oof['fold'] == k]['age'].to_numpy()
        train_mean = rows['age'][trainable & (rows['age'] <= 25)].mean()
        assert r['mean_rmse'] == pytest.approx(np.sqrt(np.mean((val_ages - train_mean) ** 2)))
    summary = pd.read_csv(os.path.join(out, 'summary.csv'))
    results = pd.read_csv(os.path.join(out, 'results.csv'))
    assert summary['mean_rmse_mean'][0] == pytest.approx(results['mean_rmse'].mean())


def test_a_diverging_combination_is_recorded_not_fatal(tiny_data, tmp_path, monkeypatch):
    class NaNLoss(torch.nn.MSELoss):
        def forward(self, out, y):
            return super().forward(out, y) * float('nan')

    monkeypatch.setitem(models.LOSSES, 'mse', NaNLoss)
    out = str(tmp_path / 'run')
    assert cv.main(['--data', tiny_data, *FAST, '--epochs', '1', '--folds', '2', '--grid',
                    'loss=mse,smoothl1',
                    '--out-dir', out]) == 0
    summary = pd.read_csv(os.path.join(out, 'summary.csv'))
    assert list(summary['combination']) == ['loss=smoothl1', 'loss=mse']
    assert list(summary['diverged']) == [0, 2] and np.isnan(summary['rmse_mean'][1])
    fold_models = pd.read_csv(os.path.join(out, 'fold_models.csv'))
    assert fold_models['checkpoint'].str.contains('smoothl1').all()


# ----------------------------------------------------------------------------- runs side by side

def results_of(out):
    return pd.read_csv(os.path.join(out, 'results.csv'))[['combination', 'fold', 'rmse', 'mae',
                                                          'r2',
                                                          'best_epoch']]


def test_side_by_side_runs_give_what_one_after_another_gives(tiny_data, tmp_path, capfd):
    """Two one-thread worker processes at once, and the same runs one after another on one
    thread: the same folds, the same numbers to the last digit, the same out-of-fold predictions."""
    argv = ['--data', tiny_data, *FAST, '--folds', '2', '--grid', 'lr=1e-3,2e-3']
    assert cv.main([*argv, '--jobs', '1', '--threads', '1', '--out-dir',
                    str(tmp_path / 'turn')]) == 0
    assert cv.main([*argv, '--jobs', '2', '--out-dir', str(tmp_path / 'side')]) == 0
    log = capfd.readouterr().out
    assert '4 runs, 2 at a time, 1 thread(s) each' in log
    assert sum(line.startswith('[') and 'finished: ' in line for line in log.splitlines()) == 4
    for name in ('folds.csv', 'oof_predictions.csv'):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / 'side' / name),
                                      pd.read_csv(tmp_path / 'turn' / name))
    pd.testing.assert_frame_equal(results_of(tmp_path / 'side'), results_of(tmp_path / 'turn'))


def test_runs_at_once_and_their_threads():
    parser = cv.build_parser()
    cores = cv.models.cpu_cores()
    assert cv.parallel_plan(cli_args(parser, []), 1, 5) == (1, None)  # the default: as before
    assert cv.parallel_plan(cli_args(parser, ['--jobs', '2']), 1, 5) == (2, max(1, cores // 2))
    assert cv.parallel_plan(cli_args(parser, ['--jobs', '8']), 1, 3)[0] == 3  # not more than runs
    assert cv.parallel_plan(cli_args(parser, ['--jobs', '2', '--threads', '3']), 1, 5) == (2, 3)
    assert cv.parallel_plan(cli_args(parser, ['--jobs', '2']), 2, 5) == (1, None)  # torchrun


def cli_args(parser, argv):
    return cv.cli.parse_args(parser, ['--model', 'cnn', '--device', 'cpu', *argv], cv=True)


SIDE_BY_SIDE = [*FAST, '--epochs', '3', '--log-every', '1', '--folds', '2', '--jobs', '2']


@pytest.fixture(scope='module')
def side_by_side_run(tiny_data, tmp_path_factory):
    """Two runs side by side, uninterrupted: what an interrupted and resumed one must equal."""
    out = tmp_path_factory.mktemp('side') / 'straight'
    assert cv.main(['--data', tiny_data, *SIDE_BY_SIDE, '--out-dir', str(out)]) == 0
    return out


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_side_by_side_runs_leaves_them_resumable(tiny_data, side_by_side_run,
                                                                 tmp_path, interrupt, sig):
    """Ctrl-C or SIGTERM to cv.py while two workers train: each saves its last.pt and stops, and
    the same command again finishes the runs with the numbers of an uninterrupted CV."""
    cut = ['cv.py', '--data', tiny_data, *SIDE_BY_SIDE, '--out-dir', tmp_path / 'cut']
    code, out = interrupt(cut, at='[2/2] epoch 2/3 step 2/', sig=sig)
    assert code == 128 + sig, out
    assert 'Traceback' not in out
    cells = (tmp_path / 'cut' / 'cells' / 'base').glob('fold*')
    saved = [p for p in cells if (p / 'last.pt').exists()]
    assert saved and not any((p / 'result.json').exists() for p in saved)
    again = subprocess.run([sys.executable, *map(str, cut)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'resumed at epoch' in again.stdout
    pd.testing.assert_frame_equal(results_of(tmp_path / 'cut'), results_of(side_by_side_run))
