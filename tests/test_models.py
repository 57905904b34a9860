"""Model shapes, the age mapping, and every way weights reach a model, all offline.

    python -m pytest -q tests/test_models.py

The ImageNet test plants a state dict in a private torch hub cache (TORCH_HOME in tmp_path); a
download attempt fails the test instead of touching the network.
"""
import os
import pickle

import pytest
import torch
import torchvision

import models
import train

CNN_WIDTHS = train.RECIPE['widths']['cnn']


class CreatesFile:
    """A pickle payload: unpickling it calls open(path, 'w'), i.e. runs code that writes to disk."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and no user hub cache: torch hub looks only in tmp_path and cannot download."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_download(url, *a, **k):
        raise AssertionError(f'tried to download {url}')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)


def random_resnet50(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None)


# ----------------------------------------------------------------------------- shapes and ages

def test_cnn_output_shape():
    model = models.build_model('cnn', widths=CNN_WIDTHS).eval()
    assert models.INPUT_CHANNELS['cnn'] == 1
    for size in (32, 64):
        x = torch.randn(2, models.INPUT_CHANNELS['cnn'], size, size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resnet50_output_shape():
    model = models.build_model('resnet50', 'none').eval()
    assert models.INPUT_CHANNELS['resnet50'] == 3
    assert model.backbone.fc.out_features == 1
    x = torch.randn(2, models.INPUT_CHANNELS['resnet50'], 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_ages_maps_standardised_outputs_back():
    model = models.build_model('cnn', 'none', y_mean=31.5, y_std=12.0, widths=CNN_WIDTHS)
    ages = model.ages(torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.bfloat16))
    assert ages.dtype == torch.float32
    torch.testing.assert_close(ages, torch.tensor([31.5, 43.5, 7.5, 37.5]))
    # The mapping travels in the state dict, so a checkpoint alone gives years.
    state = model.state_dict()
    assert float(state['y_mean']) == 31.5 and float(state['y_std']) == 12.0
    fresh = models.build_model('cnn', 'none', widths=CNN_WIDTHS)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.ages(torch.tensor([1.0])), torch.tensor([43.5]))


def test_unknown_model_and_cnn_imagenet():
    with pytest.raises(ValueError, match='vgg'):
        models.build_model('vgg')
    with pytest.raises(models.WeightsError, match='--weights none'):
        models.build_model('cnn', 'imagenet', widths=CNN_WIDTHS)


# ---------------------------------------------------------------------- ImageNet from the hub cache

def test_imagenet_weights_from_hub_cache(tmp_path):
    cache = models.imagenet_cache_file()
    assert cache.startswith(str(tmp_path / 'torch_home') + os.sep)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    assert os.path.basename(cache) == os.path.basename(url)
    reference = random_resnet50(seed=123)
    os.makedirs(os.path.dirname(cache))
    torch.save(reference.state_dict(), cache)

    model = models.build_model('resnet50', 'imagenet')
    net = model.backbone
    torch.testing.assert_close(net.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.layer4[2].conv3.weight, reference.layer4[2].conv3.weight, rtol=0,
                               atol=0)
    torch.testing.assert_close(net.bn1.running_mean, reference.bn1.running_mean, rtol=0, atol=0)
    assert not torch.equal(random_resnet50(seed=124).conv1.weight, reference.conv1.weight)
    assert net.fc.out_features == 1  # a new one-number head


def test_imagenet_weights_missing_names_the_file(tmp_path):
    cache = models.imagenet_cache_file()
    with pytest.raises(models.WeightsError) as info:
        models.build_model('resnet50', 'imagenet')
    message = str(info.value)
    assert cache in message
    assert '--weights none' in message and '--weights FILE' in message
    assert not os.path.exists(cache)


def test_imagenet_cache_file_with_pickled_code_refused(tmp_path):
    """The error message above tells users to copy the weights file from another machine; like
    --weights FILE, that file must be read as plain tensors, and a bad one must be a
    WeightsError."""
    cache = models.imagenet_cache_file()
    os.makedirs(os.path.dirname(cache))
    marker = tmp_path / 'pwned'
    torch.save({'conv1.weight': CreatesFile(marker)}, cache)
    with pytest.raises(Exception) as info:
        models.build_model('resnet50', 'imagenet')
    assert not marker.exists(), 'the file in the torch hub cache ran code while loading'
    assert info.type is models.WeightsError, f'{info.type.__name__} instead of WeightsError'
    assert cache in str(info.value)


# ----------------------------------------------------------------------------- --weights FILE

def test_weights_file_state_dict_resnet50(tmp_path):
    reference = random_resnet50(seed=7)
    path = tmp_path / 'resnet50.pth'
    torch.save(reference.state_dict(), path)  # with its 1000-class fc, which is dropped
    net = models.build_model('resnet50', str(path)).backbone
    torch.testing.assert_close(net.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.layer3[0].downsample[0].weight,
                               reference.layer3[0].downsample[0].weight,
                               rtol=0, atol=0)
    assert net.fc.out_features == 1


def test_weights_file_checkpoint_and_cnn(tmp_path):
    torch.manual_seed(11)
    source = models.build_model('cnn', 'none', y_mean=30, y_std=10, widths=CNN_WIDTHS)
    ckpt = tmp_path / 'best.pt'
    torch.save({'model': source.state_dict(), 'model_name': 'cnn', 'size': 64, 'y_mean': 30.0},
               ckpt)
    plain = tmp_path / 'cnn.pth'
    torch.save(source.backbone.state_dict(), plain)
    for path in (ckpt, plain):
        torch.manual_seed(12)  # a different init: only loading can make them equal
        loaded = models.build_model('cnn', str(path), widths=CNN_WIDTHS)
        for (name, a), (_, b) in zip(source.backbone.state_dict().items(),
                                     loaded.backbone.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f'{path.name}: {name}')


def test_weights_file_that_fits_nothing(tmp_path):
    cases = {
        'other_keys.pth': lambda p: torch.save({'encoder.weight': torch.zeros(3, 3)}, p),
        'list.pth': lambda p: torch.save([torch.zeros(2), torch.ones(2)], p),
        'numbers.pth': lambda p: torch.save({'conv1.weight': 3, 'epoch': 5}, p),
        'junk.pth': lambda p: open(p, 'wb').write(b'\x00\x01 not a torch file ' * 50),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        for model in ('resnet50', 'cnn'):
            with pytest.raises(models.WeightsError) as info:
                models.build_model(model, str(path), widths=CNN_WIDTHS)
            assert str(path) in str(info.value), (name, model, str(info.value))
    # A resnet50 state dict does not fit the cnn and says so.
    path = tmp_path / 'r50.pth'
    torch.save(random_resnet50(seed=1).state_dict(), path)
    with pytest.raises(models.WeightsError, match='does not fit cnn'):
        models.build_model('cnn', str(path), widths=CNN_WIDTHS)
    with pytest.raises(models.WeightsError, match='not found'):
        models.build_model('resnet50', str(tmp_path / 'absent.pth'))


def crafted_files(tmp_path, marker):
    """The same payload in torch's zip format and as a bare (legacy) pickle."""
    zipped = tmp_path / 'evil_zip.pth'
    torch.save({'model': CreatesFile(marker)}, zipped)
    bare = tmp_path / 'evil_bare.pth'
    with open(bare, 'wb') as f:
        pickle.dump({'conv1.weight': CreatesFile(marker)}, f, protocol=2)
    return [zipped, bare]


def test_crafted_payload_is_live(tmp_path):
    """Proves the payload below really writes a file when unpickled, so the refusals mean
    something."""
    marker = tmp_path / 'pwned_control'
    for path in crafted_files(tmp_path, marker):
        if marker.exists():
            marker.unlink()
        if path.name == 'evil_zip.pth':
            torch.load(path, weights_only=False)
        else:
            with open(path, 'rb') as f:
                pickle.load(f)
        assert marker.exists(), path.name


def test_crafted_weights_file_refused(tmp_path):
    marker = tmp_path / 'pwned'
    for path in crafted_files(tmp_path, marker):
        for model in ('resnet50', 'cnn'):
            with pytest.raises(models.WeightsError) as info:
                models.build_model(model, str(path), widths=CNN_WIDTHS)
            assert str(path) in str(info.value) and 'refused' in str(info.value)
            ran = f'{path.name} ran code while loading as --weights for {model}'
            assert not marker.exists(), ran


def test_load_checkpoint_refuses_crafted_file(tmp_path):
    marker = tmp_path / 'pwned'
    for path in crafted_files(tmp_path, marker):
        with pytest.raises(models.CheckpointError) as info:
            models.load_checkpoint(str(path))
        assert str(path) in str(info.value) and 'refused' in str(info.value)
        assert not marker.exists(), f'{path.name} ran code in models.load_checkpoint'
    with pytest.raises(models.CheckpointError, match='not found'):
        models.load_checkpoint(str(tmp_path / 'absent.pt'))


def test_load_checkpoint_round_trip(tmp_path):
    """What train.py saves (tensors, numbers, strings, vars(args)) loads under weights_only=True."""
    model = models.build_model('cnn', 'none', y_mean=40, y_std=15, widths=CNN_WIDTHS)
    ckpt = {'model': model.state_dict(), 'model_name': 'cnn', 'size': 64, 'channels': 1,
            'args': {'lr': 1e-3, 'weights': 'none', 'time_limit': None, 'device': 'cpu'},
            'y_mean': 40.0, 'y_std': 15.0, 'epoch': 3, 'val_rmse': 9.5}
    path = tmp_path / 'best.pt'
    models.save_file(str(path), ckpt)
    loaded = models.load_checkpoint(str(path))
    assert {k: v for k, v in loaded.items() if k != 'model'} == {k: v for k,
                                                                 v in ckpt.items() if k != 'model'}
    for name, value in ckpt['model'].items():
        torch.testing.assert_close(loaded['model'][name], value, rtol=0, atol=0)
    assert os.listdir(tmp_path) == ['best.pt']
