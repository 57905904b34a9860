"""train.py and predict.py through their real entry points, on tiny synthetic data, on the CPU."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import clean_data
import bench
import cli
import cv
import dataset
import demo_data
import models
import predict
import train

CNN_WIDTHS = train.RECIPE['widths']['cnn']

from conftest import FAST, ROOT  # noqa: E402


def run_train(data, out_dir, *extra):
    return train.main(['--data', data, '--out-dir', str(out_dir), *FAST, *extra])


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('run') / 'cnn'
    assert run_train(tiny_data, out) == 0
    return str(out)


def test_train_writes_the_run_directory(trained):
    metrics = read_json(os.path.join(trained, 'metrics.json'))
    for key in ('val_rmse', 'val_mae', 'val_r2', 'train_img_per_s', 'best_epoch'):
        assert np.isfinite(metrics[key])
    assert metrics['val_rmse'] >= metrics['val_mae'] > 0
    assert metrics['stopped'] == 'completed' and metrics['epochs_run'] == 2
    history = pd.read_csv(os.path.join(trained, 'history.csv'))
    assert list(history['epoch']) == [1, 2]
    best = history.loc[metrics['best_epoch'] - 1, 'val_rmse']
    assert best == pytest.approx(metrics['val_rmse'], rel=1e-9)
    val = pd.read_csv(os.path.join(trained, 'val_predictions.csv'))
    rmse = np.sqrt(np.mean((val['prediction'] - val['age']) ** 2))
    assert rmse == pytest.approx(metrics['val_rmse'], rel=1e-5)
    assert Image.open(os.path.join(trained, 'predictions.png')).size == (640, 640)
    assert not os.path.exists(os.path.join(trained, 'last.pt'))  # finished: only best.pt is kept
    ckpt = torch.load(os.path.join(trained, 'best.pt'), weights_only=True)
    assert ckpt['model_name'] == 'cnn' and ckpt['size'] == 32


def test_submission_has_exactly_the_judge_ids(tiny_data, trained, tmp_path):
    out = tmp_path / 'submission.csv'
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out', str(out),
                         '--device', 'cpu']) == 0
    sub = pd.read_csv(out)
    judge = pd.read_csv(os.path.join(tiny_data, 'wiki_judge.csv'))
    assert list(sub.columns) == ['ID', 'age']
    assert list(sub['ID']) == sorted(judge['ID'])
    assert sub['age'].between(1, 100).all()


@pytest.mark.parametrize('model', ['cnn', 'resnet50'])
def test_validation_in_train_equals_predict(tiny_data, trained, tmp_path, model):
    """The same image and checkpoint give the same number in train.py's validation and predict.py,
    flip TTA included: the 1-channel cnn, and resnet50 with its grey input repeated to 3
    channels."""
    if model == 'resnet50':
        trained = str(tmp_path / 'r50')
        assert run_train(tiny_data, trained, '--model', 'resnet50', '--epochs', '1', '--log-every',
                         '100') == 0
    val = pd.read_csv(os.path.join(trained, 'val_predictions.csv'))
    clean = pd.read_csv(os.path.join(tiny_data, 'wiki_labels_clean.csv')).set_index('ID')
    judge_dir = tmp_path / 'judge' / 'wiki_judge_images' / 'wiki_judge_images'
    judge_dir.mkdir(parents=True)
    for ID in val['ID']:
        shutil.copy(os.path.join(tiny_data, 'wiki_labeled', 'wiki_labeled', clean.loc[ID, 'path']),
                    judge_dir / f'{ID}.png')
    pd.DataFrame({'ID': val['ID'], 'full_path': [f"['{i}.png']" for i in val['ID']]}).to_csv(
        tmp_path / 'judge' / 'wiki_judge.csv', index=False)
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', os.path.join(trained, 'best.pt'), '--data',
                         str(tmp_path / 'judge'),
                         '--out', str(out), '--device', 'cpu']) == 0  # flip TTA on both sides
    merged = val.merge(pd.read_csv(out), on='ID')
    assert len(merged) == len(val) and merged['prediction'].std() > 0.01
    # 4 decimals in the CSV
    np.testing.assert_allclose(merged['age_y'], merged['prediction'], atol=1e-3)
    channels = torch.load(os.path.join(trained, 'best.pt'), weights_only=True)['channels']
    assert channels == (3 if model == 'resnet50' else 1)


def test_missing_and_unreadable_judge_images_keep_their_rows(tiny_data, trained, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns('wiki_labeled'))
    images = sorted((data / 'wiki_judge_images' / 'wiki_judge_images').iterdir())
    missing, empty = images[0], images[1]
    missing.unlink()
    empty.write_bytes(b'')
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', trained, '--data', str(data), '--out', str(out),
                         '--device', 'cpu']) == 0
    sub = pd.read_csv(out).set_index('ID')
    assert len(sub) == 20
    mean = torch.load(os.path.join(trained, 'best.pt'), weights_only=True)['y_mean']
    bad_ids = [int(missing.stem), int(empty.stem)]
    np.testing.assert_allclose(sub.loc[bad_ids, 'age'], mean, atol=1e-3)
    err = capsys.readouterr().err
    assert 'missing or unreadable' in err and all(str(i) in err for i in bad_ids)


def test_sample_submission_decides_the_ids(tiny_data, trained, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns('wiki_labeled'))
    judge = pd.read_csv(data / 'wiki_judge.csv')
    ids = sorted(judge['ID'])[::2]
    pd.DataFrame({'ID': ids[::-1], 'age': 0}).to_csv(data / 'sample_submission.csv', index=False)
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', trained, '--data', str(data), '--out', str(out),
                         '--device', 'cpu']) == 0
    assert list(pd.read_csv(out)['ID']) == ids


def test_same_seed_same_metrics(tiny_data, trained, tmp_path):
    assert run_train(tiny_data, tmp_path / 'again') == 0
    first = read_json(os.path.join(trained, 'metrics.json'))
    second = read_json(tmp_path / 'again' / 'metrics.json')
    assert first['val_rmse'] == second['val_rmse'] and first['val_r2'] == second['val_r2']


def test_existing_run_directory_is_not_overwritten(tiny_data, trained, capsys):
    before = os.path.getmtime(os.path.join(trained, 'best.pt'))
    with pytest.raises(SystemExit) as e:
        run_train(tiny_data, trained)
    assert e.value.code == 2
    assert 'already holds a run' in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(trained, 'best.pt')) == before


@pytest.mark.parametrize('flags, message', [
    (['--lr', '-1'], '--lr: must be > 0, got -1'),
    (['--batch-size', '0'], '--batch-size: must be >= 1, got 0'),
    (['--model', 'vgg16'], "invalid choice: 'vgg16'"),
    (['--loss', 'huber'], "invalid choice: 'huber'"),
    (['--size', '8'], '--size 8 is too small'),
    (['--val-frac', '0.9'], '--val-frac: must be <= 0.5, got 0.9'),
    (['--epochs', '0'], '--epochs: must be >= 1, got 0'),
    (['--weight-decay', 'nan'], "--weight-decay: 'nan' is not a finite number"),
])
def test_impossible_options_are_usage_errors(tiny_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run_train(tiny_data, tmp_path / 'x', *flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_images_in_the_clean_csv_are_skipped_and_counted(tmp_path, capsys):
    """With --no-image-check the clean CSV keeps the missing and the truncated PNG of the demo data:
    training skips exactly those rows, says so, and runs."""
    data = tmp_path / 'data'
    demo_data.make_demo_data(str(data), n=200, n_judge=5, seed=1)
    assert clean_data.main(['--data', str(data), '--no-image-check', '--min-age', '0', '--max-age',
                            '1000']) == 0
    capsys.readouterr()
    assert run_train(str(data), tmp_path / 'run', '--epochs', '1') == 0
    out = capsys.readouterr().out
    labels = dataset.read_labels(str(data / 'wiki_labels.csv'))
    # the demo's missing and truncated files
    bad_ids = [int(labels['ID'][7]), int(labels['ID'][11])]
    assert f'skipping 2 row(s) whose image cannot be read, IDs {bad_ids}' in out
    metrics = read_json(tmp_path / 'run' / 'metrics.json')
    # rows without a face neither train nor validate
    assert metrics['n_train'] + metrics['n_val'] < 198


def test_data_folder_without_the_files_says_what_it_looked_for(tmp_path, capsys):
    assert train.main(['--data', str(tmp_path), '--out-dir', str(tmp_path / 'run'), *FAST]) == 1
    assert 'wiki_labels_clean.csv not found' in capsys.readouterr().err
    assert clean_data.main(['--data', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'wiki_labels.csv' in err and 'wiki_labeled/wiki_labeled/ or wiki_labeled/' in err


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_good_checkpoint(tiny_data, tmp_path,
                                                                          monkeypatch, capsys):
    calls = {'n': 0}

    class PoisonedMSE(torch.nn.MSELoss):
        def forward(self, out, y):
            calls['n'] += 1
            loss = super().forward(out, y)
            # epoch 2 of 6-step epochs, step 3
            return loss * float('nan') if calls['n'] == 9 else loss

    monkeypatch.setitem(models.LOSSES, 'mse', PoisonedMSE)
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--loss', 'mse', '--epochs', '3') == 1
    captured = capsys.readouterr()
    steps = int(captured.out.split(' steps/epoch')[0].rsplit('(', 1)[1])
    assert f'NaN/inf at epoch {1 + 8 // steps} step {8 % steps + 1};' in captured.err
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in best['model'].values() if v.is_floating_point())


def test_out_of_memory_suggests_a_smaller_batch(tiny_data, tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(train, 'fit', oom)
    assert run_train(tiny_data, tmp_path / 'run') == 1
    assert 'try --batch-size 8' in capsys.readouterr().err


def test_time_limit_stops_cleanly_with_a_best_checkpoint(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--time-limit', '0.0001', '--epochs', '50') == 0
    metrics = read_json(out / 'metrics.json')
    assert metrics['stopped'] == 'time_limit' and metrics['epochs_run'] == 1
    assert os.path.exists(out / 'best.pt')


def test_training_only_filters_leave_validation_alone(tiny_data, trained, tmp_path):
    assert run_train(tiny_data, tmp_path / 'run', '--train-max-age', '30') == 0
    plain = read_json(os.path.join(trained, 'metrics.json'))
    filtered = read_json(tmp_path / 'run' / 'metrics.json')
    assert filtered['n_val'] == plain['n_val'] and filtered['n_train'] < plain['n_train']
    ids = pd.read_csv(tmp_path / 'run' / 'val_predictions.csv')['ID']
    assert list(ids) == list(pd.read_csv(os.path.join(trained, 'val_predictions.csv'))['ID'])


def test_validation_scores_test_like_rows_and_training_follows_its_filters(tiny_data, trained,
                                                                           tmp_path):
    """Validation: every row of its fold where a face was found, weak faces and second faces
    included (as in the Kaggle test set); the old clean rows are scored apart. Training: by
    default face score >= 1 and no second face; --train-* change that, never validation."""
    clean = pd.read_csv(os.path.join(tiny_data, 'wiki_labels_clean.csv')).set_index('ID')
    val = pd.read_csv(os.path.join(trained, 'val_predictions.csv'))
    rows = clean.loc[val['ID']]
    assert np.isfinite(rows['face_score']).all()
    weak_or_second = (rows['face_score'] < 1) | rows['second_face_score'].notna()
    assert weak_or_second.any()  # harder rows than the old cleaning kept
    metrics = read_json(os.path.join(trained, 'metrics.json'))
    assert metrics['n_val'] == len(val) and metrics['n_val_clean'] == int((~weak_or_second).sum())
    ok = val[~weak_or_second.to_numpy()]
    rmse = np.sqrt(np.mean((ok['prediction'] - ok['age']) ** 2))
    assert metrics['val_rmse_clean'] == pytest.approx(rmse, rel=1e-4)
    assert run_train(tiny_data, tmp_path / 'all', '--train-min-face-score=-inf',
                     '--train-keep-second-face') == 0
    wide = read_json(tmp_path / 'all' / 'metrics.json')
    assert wide['n_val'] == metrics['n_val'] and wide['n_train'] > metrics['n_train']


def drawn_genders(tiny_data, out_dir, monkeypatch, *flags):
    """Run train.py; return the gender of every training row, and of every row it drew, over all
    epochs."""
    seen = {}
    real_rows, real_order = clean_data.make_rows, train.epoch_order

    def make_rows(args, images, table, train_rows, val_rows):
        seen.update(gender=table['gender'].to_numpy(), train=np.asarray(train_rows))
        return real_rows(args, images, table, train_rows, val_rows)

    def epoch_order(run, epoch):
        order = real_order(run, epoch)
        seen.setdefault('drawn', []).append(order.numpy())
        return order
    monkeypatch.setattr(clean_data, 'make_rows', make_rows)
    monkeypatch.setattr(train, 'epoch_order', epoch_order)
    assert run_train(tiny_data, out_dir, *flags) == 0
    return seen['gender'][seen['train']], seen['gender'][np.concatenate(seen['drawn'])]


def test_balance_gender_draws_the_rarer_gender_as_often_and_leaves_validation_alone(
        tiny_data, trained, tmp_path, monkeypatch):
    rows, drawn = drawn_genders(tiny_data, tmp_path / 'balanced', monkeypatch, '--balance-gender',
                                '--epochs', '4')
    female_share = lambda g: (g == 0).sum() / ((g == 0) | (g == 1)).sum()  # noqa: E731
    assert female_share(rows) < 0.3  # the demo data, like wiki, has about one woman in four
    assert 0.4 < female_share(drawn) < 0.6  # balanced draws: about half of the known genders
    # unknown keeps its share
    assert np.isnan(drawn).mean() == pytest.approx(np.isnan(rows).mean(), abs=0.05)
    _, plain = drawn_genders(tiny_data, tmp_path / 'plain', monkeypatch, '--epochs', '4')
    # without it: every row once an epoch
    assert female_share(plain) == pytest.approx(female_share(rows))
    balanced = pd.read_csv(tmp_path / 'balanced' / 'val_predictions.csv')
    assert list(balanced['ID']) == list(pd.read_csv(os.path.join(trained,
                                                                 'val_predictions.csv'))['ID'])


def schedule(total_steps, warmup_steps, time_fraction=0.0, warmup=0.1):
    """A Schedule as start_run makes it, its clock held at `time_fraction` of a time limit."""
    s = train.Schedule(batch=1, steps_per_epoch=10, epochs=math.inf, total_steps=total_steps,
                       warmup=warmup, warmup_steps=warmup_steps)
    s.time_fraction = lambda: time_fraction
    return s


def test_learning_rate_warms_up_then_decays_to_zero():
    f = lambda step: train.lr_factor(step, schedule(100, 30))  # noqa: E731
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up, a tenth
    assert f(10) == pytest.approx(1.0)  # the peak
    # a sixth of the way down the cosine
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert f(55) == pytest.approx(0.5)  # half-way
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) > f(s + 1) for s in range(10, 100))
    # at most warmup_steps (the recipe's warmup_epochs): 1000 steps warm up over 60, not 100
    assert train.lr_factor(29, schedule(1000, 60)) == pytest.approx(0.5)


def test_a_run_ends_at_a_learning_rate_near_zero(trained):
    # lr: what the epoch's last step used
    history = pd.read_csv(os.path.join(trained, 'history.csv'))
    assert history['lr'].iloc[0] > 1e-4 and history['lr'].iloc[-1] < 0.05 * 1e-3


def test_under_a_time_limit_the_schedule_follows_the_larger_fraction():
    f = lambda step, t: train.lr_factor(step, schedule(100, 30, t))  # noqa: E731
    # 55% of the time gone: half-way down, whatever the step
    assert f(20, 0.55) == pytest.approx(0.5)
    # ahead in steps: the step counts
    assert f(60, 0.30) == pytest.approx(f(60, 0.0))
    assert f(3, 0.05) == pytest.approx((5 + 1) / 10)  # the warm-up runs on time too
    assert f(20, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert f(20, 1.7) == pytest.approx(0.0, abs=1e-12)


def test_a_time_limited_run_decays_to_zero_at_the_limit(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--epochs', '500', '--time-limit', '0.1', '--log-every',
                     '1000') == 0
    metrics = read_json(out / 'metrics.json')
    history = pd.read_csv(out / 'history.csv')
    # epochs: an upper bound
    assert metrics['stopped'] == 'time_limit' and metrics['epochs_run'] < 500
    # warmed up, then decayed
    assert history['lr'].max() > 5e-4 and history['lr'].iloc[-1] < 0.1 * 1e-3


def test_weight_decay_spares_norm_layers_and_biases_and_the_head_learns_faster_when_pretrained():
    args = cli.parse_args(train.build_parser(),
                          ['--model', 'resnet50', '--weights', 'none', '--weight-decay', '0.05'])
    model = models.build_model('resnet50', 'none')
    backbone_lr = models.backbone_lr(args, train.recipe_of('resnet50'))
    optimizer, _ = models.build_optimizer(model, args.lr, backbone_lr,
                                          args.weight_decay,
                                          torch.device('cpu'))
    decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0.05
             for p in g['params']}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, (torch.nn.BatchNorm2d,)) or p.dim() == 1:
                assert id(p) not in decay, name  # norm scales and shifts, biases
            else:
                assert id(p) in decay, name  # conv and linear weights
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert {g['lr'] for g in optimizer.param_groups} == {1e-3}  # from scratch: one rate
    args.weights = 'imagenet'
    backbone_lr = models.backbone_lr(args, train.recipe_of('resnet50'))
    optimizer, _ = models.build_optimizer(model, args.lr, backbone_lr,
                                          args.weight_decay,
                                          torch.device('cpu'))
    head = {id(p) for p in model.backbone.fc.parameters()}
    for g in optimizer.param_groups:
        assert g['lr'] == (1e-3 if id(g['params'][0]) in head else 1e-4)


def test_ema_weights_are_validated_and_saved(tiny_data, tmp_path, monkeypatch):
    seen, validated = {}, set()
    real_finish, real_predict = train.finish, models.predict_ages

    def finish(run, stopped):
        seen['raw'] = {k: v.clone() for k, v in run.learner.model.state_dict().items()}
        seen['ema'] = {k: v.clone() for k, v in run.learner.ema.module.state_dict().items()}
        seen['ema_id'] = id(run.learner.ema.module)
        return real_finish(run, stopped)

    def counting_predict(model, *a, **k):
        validated.add(id(model))
        return real_predict(model, *a, **k)
    monkeypatch.setattr(train, 'finish', finish)
    monkeypatch.setattr(models, 'predict_ages', counting_predict)
    assert run_train(tiny_data, tmp_path / 'val', '--ema', '0.9', '--epochs', '2') == 0
    assert validated == {seen['ema_id']}  # validation scores the average, never the raw weights
    out = tmp_path / 'final'  # without validation best.pt is the last epoch's: compare it exactly
    assert run_train(tiny_data, out, '--ema', '0.9', '--epochs', '3', '--val-frac', '0') == 0
    key = 'backbone.0.weight'
    torch.manual_seed(0)
    initial = models.build_model('cnn', 'none', widths=CNN_WIDTHS).state_dict()[key]
    # the average is not the last step
    assert (seen['raw'][key] - seen['ema'][key]).abs().max() > 1e-4
    assert (initial - seen['ema'][key]).abs().max() > 1e-3  # and it moved with training
    best = torch.load(out / 'best.pt', weights_only=True)
    torch.testing.assert_close(best['model'][key], seen['ema'][key])  # best.pt holds the average


def test_dex_predicts_an_expected_age_and_its_loss_falls(tiny_data, tmp_path):
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--loss', 'dex', '--epochs', '4', '--lr', '3e-3') == 0
    history = pd.read_csv(out / 'history.csv')
    assert history['train_loss'].iloc[-1] < history['train_loss'].iloc[0] - 0.1
    val = pd.read_csv(out / 'val_predictions.csv')
    assert val['prediction'].between(1, 100).all() and val['prediction'].std() > 0.5
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['bins'] == 101 and best['model']['backbone.19.weight'].shape == (101, 256)
    sub = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', str(out), '--data', tiny_data, '--out', str(sub),
                         '--device', 'cpu']) == 0
    assert pd.read_csv(sub)['age'].between(0, 100).all()
    loss = models.DEXLoss(y_mean=40.0, y_std=10.0, sigma=train.RECIPE['dex_sigma']['cnn'])
    logits = torch.zeros(2, 101)
    logits[0, 30], logits[1, 60] = 20.0, 20.0  # confident at 30 and at 60
    y = (torch.tensor([30.0, 60.0]) - 40) / 10
    assert loss(logits, y) < loss(logits.flip(0), y)  # right ages cost less than swapped ones
    model = models.build_model('cnn', bins=101, widths=CNN_WIDTHS)
    assert model.ages(logits).tolist() == pytest.approx([30.0, 60.0], abs=1e-3)


def test_val_frac_zero_trains_on_every_row_and_predicts(tiny_data, tmp_path, capsys):
    out = tmp_path / 'final'
    assert run_train(tiny_data, out, '--val-frac', '0', '--epochs', '2') == 0
    metrics = read_json(out / 'metrics.json')
    clean = pd.read_csv(os.path.join(tiny_data, 'wiki_labels_clean.csv'))
    # the default training filters
    trainable = (clean['face_score'] >= 1) & clean['second_face_score'].isna()
    assert metrics['n_train'] == trainable.sum()
    assert metrics['n_val'] == 0
    assert metrics['epochs_run'] == 2
    assert 'trained on all' in capsys.readouterr().out
    assert torch.load(out / 'best.pt', weights_only=True)['epoch'] == 2  # the last epoch's model
    sub = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', str(out), '--data', tiny_data, '--out', str(sub),
                         '--device', 'cpu']) == 0
    assert len(pd.read_csv(sub)) == len(pd.read_csv(os.path.join(tiny_data, 'wiki_judge.csv')))


def test_early_stopping_after_patience_epochs_without_a_better_rmse(tiny_data, tmp_path,
                                                                    monkeypatch):
    real = train.evaluate

    def worsening(run):  # the real evaluation, with an RMSE that gets worse after epoch 1
        metrics, pred = real(run)
        return {**metrics, 'rmse': 10.0 + run.progress.epoch}, pred
    monkeypatch.setattr(train, 'evaluate', worsening)
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--epochs', '10', '--patience', '2') == 0
    metrics = read_json(out / 'metrics.json')
    assert metrics['stopped'] == 'early_stop'
    assert metrics['epochs_run'] == 3
    assert metrics['best_epoch'] == 1
    assert list(pd.read_csv(out / 'history.csv')['val_rmse']) == [10.0, 11.0, 12.0]


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = models.build_model('cnn', 'none', y_mean=40.0, y_std=5.0, widths=CNN_WIDTHS)
    images = torch.randint(0, 256, (6, 100, 100), dtype=torch.uint8)
    rows = np.arange(6)
    args = (rows, 48, 1, 4, torch.device('cpu'))
    plain = models.predict_ages(model, images, *args)
    mirrored = models.predict_ages(model, images.flip(-1), *args)
    both = models.predict_ages(model, images, *args, tta=True)
    assert (plain - mirrored).abs().max() > 0.01  # the mirror image gives another age
    torch.testing.assert_close(both, (plain + mirrored) / 2)


def test_balance_weights_equalise_genders_and_keep_unknown():
    gender = np.array([1, 1, 1, 1, 1, 1, 0, 0, np.nan, np.nan])
    w = clean_data.draw_weights(gender).numpy()
    assert w[gender == 1].sum() == pytest.approx(w[gender == 0].sum())
    assert w[gender == 1].sum() + w[gender == 0].sum() == pytest.approx(8)
    np.testing.assert_array_equal(w[np.isnan(gender)], [1, 1])


def run_script(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_sigint_mid_epoch_then_resume_gives_the_same_metrics(tiny_data, tmp_path, interrupt):
    assert run_train(tiny_data, tmp_path / 'straight', '--epochs', '3') == 0
    code, _ = interrupt(['train.py', '--data', tiny_data, *FAST, '--epochs', '3', '--out-dir',
                         tmp_path / 'cut'],
                        at='epoch 2/3 step 2/')
    assert code == 130
    last = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)
    assert last['state']['epoch'] == 1 and last['state']['step'] >= 2  # saved mid-epoch 2
    assert not os.path.exists(tmp_path / 'cut' / 'metrics.json')
    resumed = run_script(['train.py', '--resume', str(tmp_path / 'cut')])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert 'resumed at epoch 2' in resumed.stdout
    straight = pd.read_csv(tmp_path / 'straight' / 'history.csv')
    cut = pd.read_csv(tmp_path / 'cut' / 'history.csv')
    cols = ['val_rmse', 'val_mae', 'val_r2']
    np.testing.assert_array_equal(straight[cols].to_numpy(), cut[cols].to_numpy())
    straight = read_json(tmp_path / 'straight' / 'metrics.json')['val_rmse']
    assert straight == read_json(tmp_path / 'cut' / 'metrics.json')['val_rmse']


def test_sigterm_saves_a_resumable_checkpoint(tiny_data, tmp_path, interrupt):
    code, out = interrupt(['train.py', '--data', tiny_data, *FAST, '--out-dir', tmp_path / 'run'],
                          at='epoch 1/2 step 2/', sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    assert 'SIGTERM: stopping after this step' in out and 'Traceback' not in out
    last = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert last['state']['epoch'] == 0 and last['state']['step'] >= 2
    assert run_script(['train.py', '--resume', str(tmp_path / 'run')]).returncode == 0
    assert read_json(tmp_path / 'run' / 'metrics.json')['epochs_run'] == 2


@pytest.mark.parametrize('argv, cv, expected', [
    (['--model', 'cnn'], False, dict(weights='none', size=48, loss='dex', lr=1e-3, epochs=30)),
    (['--model', 'resnet50'], False,
     dict(weights='imagenet', size=100, loss='smoothl1', batch_size=32)),
    (['--model', 'cnn', '--loss', 'mse'], False, dict(loss='mse')),  # a flag wins over the recipe
    (['--demo', '--size=48'], False, dict(model='cnn', size=48, lr=2e-3)),  # ... and over the demo
    (['--demo', '--model', 'resnet50'], False,
     dict(size=32, weights='none', batch_size=48, epochs=15)),
    (['--demo', '--epochs', '3'], False,
     dict(model='cnn', size=64, epochs=3, time_limit=None, batch_size=32)),
    # cv.py's demo
    (['--demo', '--model', 'resnet50'], True, dict(epochs=6, time_limit=None, size=32)),
    (['--demo', '--model', 'resnet50', '--batch-size', '16'], False, dict(batch_size=16)),
    (['--demo', '--epoch', '4', '--mod', 'resnet50'], False,
     dict(model='resnet50', size=32, epochs=4)),
])
def test_defaults_follow_the_model_and_the_demo_and_a_flag_wins(argv, cv, expected):
    args = cli.parse_args(train.build_parser(), [*argv, '--device', 'cpu'], cv=cv)
    assert {key: getattr(args, key) for key in expected} == expected


def test_the_recipe_table_is_the_one_place_a_default_is_set(monkeypatch):
    """Change entries of train.RECIPE and train.DEMO: the parser, --help and a run's learner
    follow."""
    monkeypatch.setitem(train.RECIPE, 'loss', {'cnn': 'mse', 'resnet50': 'l1'})
    monkeypatch.setitem(train.RECIPE['lr'], 'cnn', 5e-4)
    monkeypatch.setitem(train.RECIPE['batch_cpu'], 'resnet50', 8)
    monkeypatch.setitem(train.DEMO['size'], 'cnn', 40)
    cnn = cli.parse_args(train.build_parser(), ['--model', 'cnn', '--device', 'cpu'])
    assert (cnn.loss, cnn.lr, cnn.batch_size) == ('mse', 5e-4, 32)
    resnet = cli.parse_args(train.build_parser(), ['--device', 'cpu'])
    assert (resnet.loss, resnet.lr, resnet.batch_size) == ('l1', 1e-3, 8)
    assert cli.parse_args(train.build_parser(), ['--demo', '--device', 'cpu']).size == 40
    assert 'mse for cnn, l1 for resnet50' in ' '.join(train.build_parser().format_help().split())
    monkeypatch.setitem(train.RECIPE['dex_sigma'], 'cnn', 2.5)
    monkeypatch.setitem(train.RECIPE['rotation'], 'cnn', 0.0)
    dex = cli.parse_args(train.build_parser(),
                         ['--model', 'cnn', '--loss', 'dex', '--device', 'cpu'])
    rows = types.SimpleNamespace(train=range(64), age_mean=40.0, age_std=10.0)
    run = train.start_run(dex, rows, 'unused', torch.device('cpu'), 0, 1, print)
    assert run.learner.criterion.sigma == 2.5 and run.strengths['rotation'] == 0.0


def cnn_run(monkeypatch, entry, value, *argv):
    """A cnn run's pieces (start_run, without training) after train.RECIPE[entry]['cnn'] = value."""
    monkeypatch.setitem(train.RECIPE[entry], 'cnn', value)
    args = cli.parse_args(train.build_parser(), ['--model', 'cnn', '--device', 'cpu', *argv])
    rows = types.SimpleNamespace(train=range(64), age_mean=40.0, age_std=10.0)
    return train.start_run(args, rows, 'unused', torch.device('cpu'), 0, 1, print)


@pytest.mark.parametrize('entry, value, argv, follows', [
    ('train_min_face_score', 2.5, [], lambda r: r.args.train_min_face_score == 2.5),
    ('train_keep_second_face', True, [], lambda r: r.args.train_keep_second_face is True),
    ('ema', 0.9, [], lambda r: r.learner.ema is not None),
    ('tta', False, [], lambda r: r.args.tta is False),
    ('patience', 4, [], lambda r: r.args.patience == 4),
    ('val_frac', 0.25, [], lambda r: r.args.val_frac == 0.25),
    ('widths', (8, 16), [], lambda r: models.cnn_widths(r.learner.model.state_dict()) == [8, 16]),
    ('dropout', 0.5, [], lambda r: r.learner.model.backbone[-2].p == 0.5),
    ('warmup_epochs', 1, ['--epochs', '10'], lambda r: r.schedule.warmup_steps == 2),
])
def test_every_recipe_entry_is_the_one_place_its_default_is_set(monkeypatch, entry, value, argv,
                                                                follows):
    """Change one entry of RECIPE: the parser, the model or the schedule of a run follows."""
    assert not follows(cnn_run(monkeypatch, entry, train.RECIPE[entry]['cnn'], *argv))
    assert follows(cnn_run(monkeypatch, entry, value, *argv))


def test_a_pretrained_backbone_learns_at_the_recipes_share_of_lr(monkeypatch):
    monkeypatch.setitem(train.RECIPE['backbone_lr_share'], 'resnet50', 0.5)
    args = cli.parse_args(train.build_parser(), ['--device', 'cpu', '--lr', '1e-3'])
    assert args.weights == 'imagenet'
    assert models.backbone_lr(args, train.recipe_of('resnet50')) == 5e-4
    args.weights = 'none'  # from scratch: every layer at --lr
    assert models.backbone_lr(args, train.recipe_of('resnet50')) == 1e-3


def test_bench_and_cv_read_the_same_table(monkeypatch):
    monkeypatch.setitem(train.RECIPE['size'], 'cnn', 40)
    monkeypatch.setitem(train.RECIPE['batch_cpu'], 'cnn', 24)
    monkeypatch.setitem(train.RECIPE['folds'], 'cnn', 3)
    assert cli.parse_args(cv.build_parser(), ['--model', 'cnn', '--device', 'cpu'],
                          cv=True).folds == 3
    assert bench.defaults(bench.build_parser().parse_args(['--model', 'cnn']),
                          torch.device('cpu'))[:2] == (40, 24)


def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    """Both processes see the same validation numbers every epoch (process 0 evaluates and sends
    them), so they agree on the best epoch and on when to stop; the training loss they log is the
    mean over both."""
    out = tmp_path / 'ddp'
    # train.py, with each process printing what its fit returned
    wrapper = tmp_path / 'train_ranks.py'
    wrapper.write_text(f"""import json, sys
sys.path.insert(0, {ROOT!r})
import train
real = train.finish
def finish(run, stopped):
    result = real(run, stopped)
    keys = ('val_rmse', 'val_mae', 'val_r2', 'best_epoch', 'epochs_run', 'stopped')
    history = [(round(r['val_rmse'], 9), round(r['train_loss'], 6)) for r in run.progress.history]
    print('RESULT', run.rank, json.dumps({{k: result[k] for k in keys}}), history, flush=True)
    return result
train.finish = finish
sys.exit(train.main())
""")
    proc = run_script(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                       str(wrapper),
                       '--data', tiny_data, '--out-dir', str(out), *FAST, '--epochs', '3'],
                      env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('done: val RMSE') == 1  # only rank 0 logs
    results = {line.split()[1]: line.split(' ', 2)[2] for line in proc.stdout.splitlines()
               if line.startswith('RESULT')}
    assert set(results) == {'0', '1'} and results['0'] == results['1']
    metrics = read_json(out / 'metrics.json')
    assert metrics['world_size'] == 2 and np.isfinite(metrics['val_rmse'])
    assert torch.load(out / 'best.pt', weights_only=True)['model_name'] == 'cnn'


def test_torchrun_cv_spreads_the_folds_over_two_processes(tiny_data, tmp_path):
    out = tmp_path / 'cv'
    proc = run_script(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'cv.py',
                       '--data', tiny_data, '--out-dir', str(out), '--folds', '2', *FAST],
                      env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = pd.read_csv(out / 'results.csv')
    assert sorted(results['fold']) == [0, 1] and results['rmse'].notna().all()
    assert proc.stdout.count('summary (mean and std') == 1  # rank 0 reports


def test_batch_size_default_follows_the_device_and_the_flag_wins(monkeypatch):
    parser = train.build_parser()
    cpu, gpu = train.RECIPE['batch_cpu']['resnet50'], train.RECIPE['batch_gpu']['resnet50']
    assert cli.parse_args(parser, ['--device', 'cpu']).batch_size == cpu == 32
    assert cli.parse_args(parser, ['--device', 'cuda']).batch_size == gpu == 128
    assert cli.parse_args(parser, ['--device', 'cuda', '--batch-size', '7']).batch_size == 7
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # auto picks what the machine has
    assert cli.parse_args(parser, []).batch_size == 128
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert cli.parse_args(parser, []).batch_size == 32


def test_channels_last_on_the_cpu_and_a_large_evaluation_batch_on_cuda():
    """The model is placed in channels-last memory on the CPU; a plain NCHW input then runs its
    convolutions channels-last too, with the same numbers as a channels-last input."""
    model = models.place(models.build_model('resnet50', 'none'), torch.device('cpu')).eval()
    conv = model.backbone.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = dataset.to_model_input(torch.randint(0, 256, (4, 40, 40), dtype=torch.uint8), 32, 3)
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous()
    with torch.no_grad():
        out = conv(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, conv(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=0, atol=0)
    assert models.eval_batch(128, torch.device('cpu')) == 256
    assert models.eval_batch(128, torch.device('cuda')) == 1024
    assert models.eval_batch(1024, torch.device('cuda')) == 2048


def test_without_epochs_a_time_limit_alone_ends_the_run_with_its_decay():
    parser = train.build_parser()
    assert cli.parse_args(parser, []).epochs == train.RECIPE['epochs']['resnet50'] == 30
    assert cli.parse_args(parser, ['--time-limit', '5']).epochs is None  # as many as fit
    # the user's bound stays
    assert cli.parse_args(parser, ['--time-limit', '5', '--epochs', '3']).epochs == 3
    f = lambda step, t: train.lr_factor(step, schedule(None, 1000, t))  # noqa: E731
    # the first tenth of the time warms up
    assert f(7, 0.0) == pytest.approx(0.008) and f(7, 0.05) == pytest.approx(0.5)
    # then the cosine, on time alone
    assert f(7, 0.1) == pytest.approx(1.0) and f(7, 0.55) == pytest.approx(0.5)
    assert f(7, 1.0) == pytest.approx(0.0, abs=1e-12) and f(7, 1.5) == pytest.approx(0.0, abs=1e-12)


def test_the_time_limited_warm_up_follows_the_recipe(monkeypatch):
    """Under --time-limit alone the warm-up is RECIPE's share of the time, at most its
    warmup_epochs: change either, and the schedule a run builds follows."""
    def factor(step, time_fraction):
        args = cli.parse_args(train.build_parser(), ['--model', 'cnn', '--time-limit', '10',
                                                     '--device', 'cpu'])
        rows = types.SimpleNamespace(train=range(3200), age_mean=40.0, age_std=15.0)
        s = train.start_run(args, rows, 'unused', torch.device('cpu'), 0, 1, print).schedule
        s.time_fraction = lambda: time_fraction
        return train.lr_factor(step, s)
    # 100 steps an epoch; the recipe: a tenth of the time, at most 3 epochs
    assert factor(0, 0.05) == pytest.approx(0.5)  # half of the tenth
    assert factor(299, 0.05) == pytest.approx(1.0)  # 3 epochs done: warmed up, the peak holds
    assert factor(100, 0.2) < 1.0  # past the tenth: the cosine
    monkeypatch.setitem(train.RECIPE['warmup'], 'cnn', 0.2)
    assert factor(0, 0.05) == pytest.approx(0.25) and factor(100, 0.2) == pytest.approx(1.0)
    monkeypatch.setitem(train.RECIPE['warmup_epochs'], 'cnn', 1)
    assert factor(99, 0.05) == pytest.approx(1.0)  # one epoch is the most it may last


def test_a_time_limited_run_without_epochs_uses_the_whole_budget(tiny_data, tmp_path):
    out = tmp_path / 'run'
    argv = [a for a in FAST if a not in ('--epochs', '2')]
    assert train.main(['--data', tiny_data, '--out-dir', str(out), *argv, '--time-limit', '0.05',
                       '--log-every', '1000']) == 0
    metrics = read_json(out / 'metrics.json')
    history = pd.read_csv(out / 'history.csv')
    # ran to the 3-second limit
    assert metrics['stopped'] == 'time_limit' and metrics['seconds'] >= 3.0
    assert history['lr'].iloc[-1] < 0.1 * 1e-3  # and its learning rate had decayed there


def test_compile_without_a_compiler_warns_once_and_trains_eagerly(tiny_data, tmp_path, monkeypatch,
                                                                  capsys):
    """A laptop without gcc: inductor cannot build its C++ kernels. One warning line, then eager."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, 'cxx', ('/nonexistent/g++',))
    # nothing compiled before
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    out = tmp_path / 'run'
    assert run_train(tiny_data, out, '--epochs', '1', '--compile') == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith('warning: --compile')]
    assert len(warnings) == 1 and 'torch.compile does not work on this machine' in warnings[0]
    assert 'training without it' in warnings[0] and 'Traceback' not in captured.err
    assert read_json(out / 'metrics.json')['epochs_run'] == 1
