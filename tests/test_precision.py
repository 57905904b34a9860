"""--precision: what `auto` chooses on each kind of device, and that bf16 trains and predicts
honestly: fp32 weights, AdamW state, BatchNorm statistics, head and expected age; a checkpoint
trained in one precision predicts in any.

    python -m pytest -q tests/test_precision.py
"""
import numpy as np
import pandas as pd
import pytest
import torch

import cli
import dataset
import models
import predict
import train

CPU, CUDA = torch.device('cpu'), torch.device('cuda')


def cpu_with(monkeypatch, avx512_bf16=False, amx=False):
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)


def gpu_with(monkeypatch, native_bf16):
    """A T4 or P100 (Kaggle's) has no bf16 units: is_bf16_supported() says True there unless asked
    without emulation."""
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'a GPU')


@pytest.mark.parametrize('avx512_bf16, amx, expected, why', [
    (True, False, 'bf16', 'this CPU has AVX512-BF16'),
    (False, True, 'bf16', 'this CPU has AMX'),
    (True, True, 'bf16', 'this CPU has AVX512-BF16'),
    (False, False, 'fp32', 'this CPU has no native bf16'),
])
def test_auto_on_a_cpu_takes_bf16_only_where_it_computes_it(monkeypatch, avx512_bf16, amx,
                                                            expected, why):
    cpu_with(monkeypatch, avx512_bf16, amx)
    precision, reason = models.choose_precision('auto', CPU)
    assert precision == expected and reason.startswith(why)


def test_auto_on_a_gpu_takes_bf16_where_native_else_fp16(monkeypatch):
    gpu_with(monkeypatch, native_bf16=True)
    assert models.choose_precision('auto', CUDA) == ('bf16', 'the GPU (a GPU) computes bf16')
    gpu_with(monkeypatch, native_bf16=False)
    assert models.choose_precision('auto', CUDA)[0] == 'fp16'


def test_the_demo_and_an_explicit_choice_ignore_the_device(monkeypatch):
    cpu_with(monkeypatch, avx512_bf16=True)
    gpu_with(monkeypatch, native_bf16=True)
    for device in (CPU, CUDA):
        assert models.choose_precision('auto', device, demo=True)[0] == 'fp32'
        assert models.choose_precision('fp32', device)[0] == 'fp32'
    cpu_with(monkeypatch)
    assert models.choose_precision('bf16', CPU) == ('bf16', '--precision bf16')  # emulated: asked
    with pytest.raises(dataset.UserError, match='fp16 needs a CUDA GPU'):
        models.choose_precision('fp16', CPU)


def test_fp16_on_the_cpu_ends_in_one_line(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert train.main(['--data', tiny_data, '--out-dir', str(out), '--model', 'cnn', '--device',
                       'cpu', '--precision', 'fp16', '--epochs', '1']) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: --precision fp16 needs a CUDA GPU (this run is on cpu); use bf16 or fp32']
    assert not out.exists()


def tiny_learner(precision, loss='dex'):
    args = cli.parse_args(train.build_parser(), ['--model', 'cnn', '--loss', loss, '--precision',
                                                 precision, '--batch-size', '8', '--device', 'cpu'])
    return models.build_learner(args, train.recipe_of('cnn'), 40.0, 15.0, CPU)


def test_a_bf16_step_moves_fp32_weights_and_keeps_fp32_state(monkeypatch):
    """Autocast computes the convolutions in bf16; the parameters, AdamW's moments, BatchNorm's
    running statistics, the head's output and the loss stay fp32."""
    learner = tiny_learner('bf16')
    model = learner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 48, 48)
    y = torch.randn(8)
    with models.autocast(CPU, 'bf16'):
        assert model.backbone[0](x).dtype == torch.bfloat16  # the convolutions do compute in bf16
        assert model(x).dtype == torch.float32  # ... but not the head
    loss = train.train_step(learner, x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = model.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and
             not torch.equal(before[k], after[k])]
    assert 'backbone.0.weight' in moved and 'backbone.1.running_mean' in moved
    assert all(v.dtype in (torch.float32, torch.int64) for v in after.values())
    state = learner.optimizer.state_dict()['state']
    assert state and all(t.dtype == torch.float32 for s in state.values()
                         for k, t in s.items() if k != 'step')


def test_the_expected_age_is_fp32_under_bf16_autocast():
    """bf16 keeps 8 bits of mantissa: an expected age of 60 computed in it is off by up to 0.25."""
    model = models.AgeRegressor(torch.nn.Identity(), bins=models.AGE_BINS)
    logits = torch.randn(64, models.AGE_BINS) * 3
    exact = model.ages(logits)
    with models.autocast(CPU, 'bf16'):
        under_autocast = model.ages(logits)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=0)


def train_tiny(tiny_data, out, *flags):
    assert train.main(['--data', tiny_data, '--out-dir', str(out), '--model', 'cnn', '--weights',
                       'none', '--size', '32', '--batch-size', '16', '--epochs', '2', '--device',
                       'cpu', *flags]) == 0
    return pd.read_csv(out / 'history.csv')


def test_the_demo_stays_fp32_on_a_cpu_that_computes_bf16(tiny_data, tmp_path, monkeypatch):
    """--demo does not depend on a bf16 unit: on a CPU with native bf16 it trains
    exactly as --precision fp32 does, to the last digit."""
    cpu_with(monkeypatch, avx512_bf16=True)
    fp32 = train_tiny(tiny_data, tmp_path / 'fp32', '--precision', 'fp32')
    demo = train_tiny(tiny_data, tmp_path / 'demo', '--demo', '--lr', '1e-3')
    for column in ('train_loss', 'val_rmse', 'val_mae'):
        np.testing.assert_array_equal(demo[column], fp32[column])
    bf16 = train_tiny(tiny_data, tmp_path / 'bf16')  # auto: bf16 on this CPU
    assert not np.array_equal(bf16['train_loss'], fp32['train_loss'])
    assert pd.read_json(tmp_path / 'bf16' / 'metrics.json', typ='series')['precision'] == 'bf16'


def test_a_bf16_checkpoint_predicts_in_fp32_and_the_two_agree(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / 'run', '--precision', 'bf16')
    ages = {}
    for precision in ('fp32', 'bf16'):
        out = tmp_path / f'{precision}.csv'
        assert predict.main(['--checkpoint', str(tmp_path / 'run'), '--data', tiny_data,
                             '--device', 'cpu', '--precision', precision, '--out', str(out)]) == 0
        ages[precision] = pd.read_csv(out)['age'].to_numpy()
    assert not np.array_equal(ages['fp32'], ages['bf16'])  # really computed in two precisions
    assert np.sqrt(np.mean((ages['fp32'] - ages['bf16']) ** 2)) < 0.1
