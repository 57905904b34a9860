"""The two models: `cnn`, the plain baseline a course writes first, and `resnet50` (torchvision,
ImageNet-pretrained when the weights are on disk) with a one-number regression head.

    python models.py                 # parameter counts and output shapes of both

Both predict the age standardised by the training set's mean and standard deviation, which are
stored in the model as buffers, so a checkpoint alone maps outputs back to years.
"""
import os
import sys

import torch
import torch.nn as nn
import torchvision

MODELS = ('cnn', 'resnet50')
MIN_SIZE = {'cnn': 32, 'resnet50': 32}  # below this the feature maps vanish
INPUT_CHANNELS = {'cnn': 1, 'resnet50': 3}  # ImageNet backbones expect RGB: grey is repeated


class WeightsError(Exception):
    """--weights cannot be honoured; the message says what to do instead."""


class FP32Linear(nn.Linear):
    """The one-number head in fp32 even under bf16 autocast: bf16 keeps 8 bits of mantissa, which
    would round a standardised age to about 0.2 years before it is mapped back."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class AgeRegressor(nn.Module):
    """backbone(x) -> one standardised age per image, or with bins (DEX) one logit per year of age;
    `ages()` maps either to years."""

    def __init__(self, backbone, y_mean=0.0, y_std=1.0, bins=0):
        super().__init__()
        self.backbone = backbone
        self.bins = bins
        self.register_buffer('y_mean', torch.tensor(float(y_mean)))
        self.register_buffer('y_std', torch.tensor(float(y_std)))
        self.register_buffer('bin_ages', torch.arange(float(bins)), persistent=False)

    def forward(self, x):
        out = self.backbone(x)
        return out if self.bins else out.squeeze(1)

    def ages(self, out):
        if self.bins:  # DEX: the expected value of the softmax over the ages 0..100
            return torch.softmax(out.float(), dim=1) @ self.bin_ages
        return out.float() * self.y_std + self.y_mean


def cnn(outputs=1):
    """Four conv-BN-ReLU-pool blocks, global average pooling and a linear head: the baseline."""
    layers, c_in = [], 1
    for c_out in (32, 64, 128, 256):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), FP32Linear(256, outputs))


def imagenet_cache_file():
    """Where torchvision's weights API looks for the ResNet-50 ImageNet weights (torch hub cache)."""
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))


def load_weights_file(path):
    """A state dict from --weights FILE: torchvision's .pth, or one of this project's checkpoints.
    weights_only=True: a file that carries pickled code is refused, and nothing in it runs."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f'--weights {path}: file not found') from None
    except Exception as e:  # UnpicklingError for crafted files, RuntimeError for junk
        raise WeightsError(f'--weights {path}: not a plain weights file ({type(e).__name__}); refusing to '
                           'load it (files that carry Python objects could run code)') from None
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        state = {k.removeprefix('backbone.'): v for k, v in state['model'].items()
                 if k.startswith('backbone.')}  # one of our checkpoints: reuse its backbone
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f'--weights {path}: expected a state dict of tensors')
    return state


def resnet50(weights='imagenet', outputs=1):
    """torchvision's ResNet-50 with its 1000-class layer replaced by `outputs` outputs."""
    # From scratch, each residual branch starts at zero (its last BN scale is 0), so the untrained
    # network is shallow and trains faster (Goyal et al. 2017). Pretrained weights overwrite this.
    net = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    if weights == 'imagenet':
        cache = imagenet_cache_file()
        if not os.path.exists(cache):  # never download: lab machines and CI may be offline
            raise WeightsError(
                f'ImageNet weights for resnet50 are not in the torch hub cache: expected {cache}.\n'
                '  Download them once on a machine with internet: python -c "import torchvision; '
                'torchvision.models.resnet50(weights=\'IMAGENET1K_V2\')"\n'
                '  and copy that file there, or choose --weights none (train from scratch) '
                'or --weights FILE (a state dict you have).')
        try:  # weights_only: the file may have been copied from elsewhere; nothing in it may run
            weights_api = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
            net.load_state_dict(weights_api.get_state_dict(progress=False, weights_only=True))
        except Exception as e:
            raise WeightsError(f'{cache} is not the ResNet-50 ImageNet weights ({type(e).__name__}); '
                               'delete it and copy the file again, or choose --weights none') from None
    elif weights not in (None, 'none'):
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}  # the head is new
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as e:  # strict=False forgives missing and extra keys, not wrong shapes
            raise WeightsError(f'--weights {weights}: does not fit resnet50 '
                               f'({str(e).splitlines()[-1].strip()[:200]})') from None
        missing = [k for k in missing if not k.startswith('fc.')]
        if missing or unexpected:
            raise WeightsError(f'--weights {weights}: does not fit resnet50 '
                               f'({len(missing)} missing keys e.g. {missing[:2]}, '
                               f'{len(unexpected)} unexpected e.g. {unexpected[:2]})')
    net.fc = FP32Linear(net.fc.in_features, outputs)
    return net


def build_model(name, weights='none', y_mean=0.0, y_std=1.0, bins=0):
    """The model `name` with a one-number head, or with bins > 0 a head of one logit per year (DEX)."""
    outputs = bins or 1
    if name == 'cnn':
        if weights == 'imagenet':
            raise WeightsError('--weights imagenet: the cnn baseline has no pretrained weights; use --weights none')
        net = cnn(outputs)
        if weights not in (None, 'none'):
            try:
                net.load_state_dict(load_weights_file(weights))
            except RuntimeError as e:
                raise WeightsError(f'--weights {weights}: does not fit cnn ({str(e).splitlines()[0]})') from None
    elif name == 'resnet50':
        net = resnet50(weights, outputs)
    else:
        raise ValueError(f'unknown model {name!r}; choose from {", ".join(MODELS)}')
    return AgeRegressor(net, y_mean, y_std, bins)


if __name__ == '__main__':
    for name in MODELS:
        model = build_model(name)
        x = torch.zeros(2, INPUT_CHANNELS[name], 100, 100)
        print(f'{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
              f'output {tuple(model(x).shape)} for input {tuple(x.shape)}')
    sys.exit(0)
