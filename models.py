"""The two models: `cnn`, the plain baseline a course writes first, and `resnet50` (torchvision,
ImageNet-pretrained when the weights are on disk) with a one-number regression head.

Both predict the age standardised by the training set's mean and standard deviation, which are
stored in the model as buffers, so a checkpoint alone maps outputs back to years. Also here: the
losses (DEX's beside its head), the Learner (model, optimizer, loss and the rest a step uses),
THE prediction path (`predict_ages`), where and how a model runs (device, precision and autocast,
memory layout), and reading checkpoint and weights files, whose fields are checked once, when
they are loaded.
"""
import contextlib
import dataclasses
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import dataset

MODELS = ('cnn', 'resnet50')
MIN_SIZE = {'cnn': 32, 'resnet50': 32}  # below this the feature maps vanish
MAX_SIZE = 512  # the faces are 100x100: larger inputs only upsample them
INPUT_CHANNELS = {'cnn': 1, 'resnet50': 3}  # ImageNet backbones expect RGB: grey is repeated
AGE_BINS = int(dataset.AGE_RANGE[1]) + 1  # DEX: one class for each age from 0 to the oldest


class WeightsError(dataset.UserError):
    """--weights cannot be honoured; the message says what to do instead."""


class CheckpointError(dataset.UserError):
    """A checkpoint that is missing, refused or does not fit: the message names the file."""


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
        # in fp32 under any autocast: bf16 would round an age of 60 to a quarter of a year
        with torch.autocast(out.device.type, enabled=False):
            if self.bins:  # DEX: the expected value of the softmax over the ages 0..100
                return torch.softmax(out.float(), dim=1) @ self.bin_ages
            return out.float() * self.y_std + self.y_mean


@torch.inference_mode()
def predict_ages(model, images, rows, size, channels, batch_size, device, tta=False,
                 precision='fp32'):
    """Ages in years for images[rows] (uint8 faces, on any device): THE prediction path, which
    train.py's validation, cv.py's out-of-fold scores and predict.py share, so a checkpoint gives
    the same ages everywhere. tta=True averages each face with its mirror image. Clipped to the
    ages the clean data holds. A checkpoint predicts in any precision: its weights are fp32."""
    model.eval()
    out = []
    rows = torch.as_tensor(rows)
    views = (False, True) if tta else (False,)
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size].to(images.device)
        x_u8 = images.index_select(0, idx).to(device, non_blocking=True)
        total = 0
        for flip in views:
            with autocast(device, precision):
                x = dataset.to_model_input(x_u8, size, channels, flip=flip)
                total = total + model.ages(model(x))
        out.append((total / len(views)).clamp(*dataset.AGE_RANGE))
    return torch.cat(out).float().cpu() if out else torch.empty(0)


def eval_batch(train_batch, device):
    """Images per evaluation batch: no gradients are kept and each layer's activations are freed
    as the next is computed, so on a GPU it can be large, which saves kernel launches; on the CPU
    larger batches only leave the caches."""
    return max(2 * train_batch, 1024) if device.type == 'cuda' else 2 * train_batch


def cnn(widths, dropout, outputs=1):
    """A conv-BN-ReLU-pool block for each of `widths` (its channels), global average pooling,
    dropout and a linear head: the baseline."""
    layers, c_in = [], 1
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         FP32Linear(c_in, outputs))


def cnn_widths(state):
    """The widths of the cnn whose state dict this is: the output channels of its convolutions,
    so that a checkpoint alone rebuilds the network it holds."""
    return [v.shape[0] for k, v in state.items() if k.endswith('.weight') and v.dim() == 4]


def resnet50(weights='imagenet', outputs=1):
    """torchvision's ResNet-50 with its 1000-class layer replaced by `outputs` outputs."""
    # From scratch, each residual branch starts at zero (its last BN scale is 0), so the untrained
    # network is shallow and trains faster (Goyal et al. 2017). Pretrained weights overwrite this.
    net = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    if weights == 'imagenet':
        cache = imagenet_cache_file()
        if not os.path.exists(cache):  # never download: lab machines and CI may be offline
            raise WeightsError(
                f'ImageNet weights for resnet50 are not in the torch hub cache: expected {cache}. '
                'Download them once on a machine with internet (python -c "import torchvision; '
                'torchvision.models.resnet50(weights=\'IMAGENET1K_V2\')") and copy that file '
                'there, or choose --weights none (train from scratch) or --weights FILE (a state '
                'dict you have)')
        try:  # weights_only: the file may have been copied from elsewhere; nothing in it may run
            weights_api = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
            net.load_state_dict(weights_api.get_state_dict(progress=False, weights_only=True))
        except Exception as e:
            raise WeightsError(f'{cache} is not the ResNet-50 ImageNet weights '
                               f'({type(e).__name__}); delete it and copy the file again, or '
                               'choose --weights none') from None
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


def build_model(name, weights='none', y_mean=0.0, y_std=1.0, bins=0, widths=None, dropout=0.0):
    """The model `name` with a one-number head, or with bins > 0 a head of one logit per year
    (DEX). The cnn's shape (widths, dropout) is train.RECIPE's; ResNet-50's is torchvision's."""
    outputs = bins or 1
    if name == 'cnn':
        if weights == 'imagenet':
            raise WeightsError('--weights imagenet: the cnn baseline has no pretrained weights; '
                               'use --weights none')
        if not widths:
            raise ValueError('the cnn needs its widths (train.RECIPE)')
        net = cnn(widths, dropout, outputs)
        if weights not in (None, 'none'):
            try:
                net.load_state_dict(load_weights_file(weights))
            except RuntimeError as e:
                raise WeightsError(f'--weights {weights}: does not fit cnn '
                                   f'({str(e).splitlines()[0]})') from None
    elif name == 'resnet50':
        net = resnet50(weights, outputs)
    else:
        raise ValueError(f'unknown model {name!r}; choose from {", ".join(MODELS)}')
    return AgeRegressor(net, y_mean, y_std, bins)


# ----------------------------------------------------------------------------- losses

class DEXLoss(nn.Module):
    """Cross-entropy of the 101 age logits against a Gaussian around the true age (soft labels);
    the prediction is the softmax's expected value (AgeRegressor.ages). Targets come in
    standardised, like those of the regression losses."""

    def __init__(self, y_mean, y_std, sigma):
        super().__init__()
        self.y_mean, self.y_std, self.sigma = y_mean, y_std, sigma

    def forward(self, logits, y):
        age = y * self.y_std + self.y_mean
        bins = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
        soft = torch.softmax(-(bins - age[:, None]) ** 2 / (2 * self.sigma ** 2), dim=1)
        return -(soft * torch.log_softmax(logits, dim=1)).sum(1).mean()


LOSSES = {'mse': nn.MSELoss, 'smoothl1': nn.SmoothL1Loss, 'l1': nn.L1Loss, 'dex': DEXLoss}


def make_criterion(name, y_mean, y_std, dex_sigma):
    """The loss `name` on standardised targets; DEX needs the scale to place its age bins, and
    the width in years of its soft labels."""
    return LOSSES[name](y_mean, y_std, dex_sigma) if name == 'dex' else LOSSES[name]()


@dataclasses.dataclass
class Learner:
    """The model and what trains it (train.py's train_step uses them all)."""
    model: nn.Module             # saved, evaluated and restored
    step_model: nn.Module        # what a step calls: `model` wrapped for DDP or torch.compile
    ema: nn.Module               # --ema: the moving average (validated and saved), else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    precision: str               # 'fp32', 'bf16' or 'fp16': what autocast computes in
    precision_why: str           # why that one (--precision auto chooses by the device)

    def evaluated(self):
        """The model that is validated and saved in best.pt: the moving average with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def parts(self):
        """What last.pt keeps, by its keys in the file."""
        return {'model': self.model, 'optimizer': self.optimizer, 'ema': self.ema,
                'scaler': self.scaler}


def build_learner(args, recipe, age_mean, age_std, device, world=1, log=print):
    """The Learner of a run: args are train.py's options, recipe the model's column of
    train.RECIPE (its widths, dropout, DEX sigma and backbone share); age_mean and age_std those of
    the training rows. world > 1: wrapped for DistributedDataParallel."""
    torch.manual_seed(args.seed)  # the initial weights (and dropout) draw from the global generator
    bins = AGE_BINS if args.loss == 'dex' else 0
    model = place(build_model(args.model, args.weights, age_mean, max(age_std, 1e-3), bins,
                              recipe['widths'], recipe['dropout']), device)
    step_model = model
    if world > 1:
        ids = [device.index] if device.type == 'cuda' else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        step_model = compile_model(step_model, args.compile, device, log)
    ema = None
    if args.ema:
        average = torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    precision, why = choose_precision(args.precision, device, args.demo)
    optimizer, scaler = build_optimizer(model, args.lr, backbone_lr(args, recipe),
                                        args.weight_decay, device, precision)
    criterion = make_criterion(args.loss, age_mean, age_std, recipe['dex_sigma'])
    return Learner(model=model, step_model=step_model, ema=ema, optimizer=optimizer, scaler=scaler,
                   criterion=criterion, precision=precision, precision_why=why)


def backbone_lr(args, recipe):
    """A pretrained backbone learns slower than the new head (the recipe's share of --lr), so that
    fine-tuning keeps what ImageNet taught it; from scratch all layers share --lr."""
    if args.backbone_lr:
        return args.backbone_lr
    pretrained = args.weights not in (None, 'none')
    return args.lr * recipe['backbone_lr_share'] if pretrained else args.lr


def build_optimizer(model, lr, backbone_lr, weight_decay, device, precision='fp32'):
    """AdamW (its fused kernel on CUDA and the CPU) and the loss scaler, which only fp16 needs (its
    smallest number is 6e-8: small gradients would vanish unscaled).
    Four parameter groups: the head (at lr) and the backbone (at backbone_lr), each split into
    conv/linear weights, which decay, and norm-layer weights and biases, which do not (decaying
    those only shrinks what normalisation sets, as nanoGPT's optimizer set-up notes)."""
    head = {id(p) for m in model.modules() if isinstance(m, FP32Linear) for p in m.parameters()}
    grouped = {}
    for p in model.parameters():
        grouped.setdefault((id(p) in head, p.dim() >= 2), []).append(p)
    groups = []
    for (is_head, decays), params in grouped.items():
        rate = lr if is_head else backbone_lr
        groups.append({'params': params, 'lr': rate, 'initial_lr': rate,
                       'weight_decay': weight_decay if decays else 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=device.type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler('cuda', enabled=precision == 'fp16')
    return optimizer, scaler


# ----------------------------------------------------------------------------- where a model runs

def pick_device(name):
    """--device: 'auto' takes a CUDA GPU, else Apple's MPS, else the CPU. On a GPU, cuDNN times
    its kernels once and keeps the fastest: every batch has the same shape."""
    if name == 'auto':
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise dataset.UserError('--device cuda but torch sees no CUDA GPU '
                                '(torch.cuda.is_available() is False)')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise dataset.UserError('--device mps but this torch has no MPS support')
    torch.backends.cudnn.benchmark = name == 'cuda'
    return torch.device(name)


PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # None: no autocast


def cpu_bf16_unit():
    """The unit that makes this CPU compute bf16 natively ('AVX512-BF16' or 'AMX'), or None:
    without one, torch emulates bf16 and runs far slower than in fp32."""
    if torch.cpu._is_avx512_bf16_supported():
        return 'AVX512-BF16'
    return 'AMX' if torch.cpu._is_amx_tile_supported() else None


def choose_precision(name, device, demo=False):
    """--precision: (the precision a run computes in, why). 'auto' takes bf16 where the device
    computes it natively (a CPU with AVX512-BF16 or AMX, a GPU of the Ampere generation or newer),
    fp16 with loss scaling on older GPUs such as Kaggle's T4 and P100, and fp32 elsewhere; --demo
    stays in fp32, so that a bf16 unit does not change its numbers."""
    if name == 'fp16' and device.type != 'cuda':
        raise dataset.UserError(f'--precision fp16 needs a CUDA GPU (this run is on '
                                f'{device.type}); use bf16 or fp32')
    if name != 'auto':
        return name, f'--precision {name}'
    if demo:
        return 'fp32', '--demo computes in fp32 on every machine'
    if device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return 'bf16', f'the GPU ({gpu}) computes bf16'
        return 'fp16', f'the GPU ({gpu}) has no bf16: fp16 with loss scaling'
    if device.type == 'cpu':
        unit = cpu_bf16_unit()
        if unit:
            return 'bf16', f'this CPU has {unit}'
        return 'fp32', 'this CPU has no native bf16 (AVX512-BF16 or AMX), which it would emulate'
    return 'fp32', f'the default on {device.type}'


def autocast(device, precision):
    """Autocast to the precision's dtype (fp32: none). Parameters, AdamW's state and BatchNorm's
    running statistics stay fp32 either way; autocast only runs the matrix products and
    convolutions in the lower precision."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def place(model, device):
    """The model on `device`, in channels-last memory (NHWC) on CUDA and on the CPU, the layout
    cuDNN's and oneDNN's fastest convolutions read; a convolution whose weights are channels-last
    also computes a plain NCHW input that way, so the inputs need no conversion."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type in ('cuda', 'cpu') else model


@contextlib.contextmanager
def distributed(device_name, backend=None, timeout=None):
    """Yields (rank, world_size, device). Under torchrun (RANK in the environment) one process per
    GPU joins the process group, which is torn down on the way out, errors included.
    backend: default nccl on GPUs, gloo on CPUs."""
    if 'RANK' not in os.environ:
        yield 0, 1, pick_device(device_name)
        return
    use_cuda = torch.cuda.is_available() and device_name != 'cpu'
    dist.init_process_group(backend or ('nccl' if use_cuda else 'gloo'), timeout=timeout)
    try:
        if use_cuda:
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True  # as pick_device
        else:
            device = torch.device('cpu')
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def cpu_cores():
    """The CPU cores this process may run on (what a job scheduler or taskset allows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(n):
    """torch's CPU threads set to n for what runs inside (None: left as they are), then restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compile_model(model, mode, device, log=print):
    """torch.compile(model, mode=mode) where this machine can compile: inductor needs a C++ compiler
    for the CPU and Triton for a GPU. A one-line function is compiled first, so a missing compiler
    costs one warning line and the run goes on eagerly, instead of failing at its first step."""
    try:
        torch.compile(lambda x: x * 2 + 1, mode=mode)(torch.ones(8, device=device))
    except Exception as e:  # a missing or broken compiler shows up as one of many exception types
        log(f'warning: --compile {mode}: torch.compile does not work on this machine '
            f'({type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:160]}); training '
            'without it')
        return model
    return torch.compile(model, mode=mode)


# ----------------------------------------------------------------------------- files

def load_file(path):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts only. A file
    that carries a pickled object (one that could run code when loaded) is refused, and nothing in
    it runs. Every checkpoint and weights file of the project is read here."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: not found') from None
    # UnpicklingError for crafted files, RuntimeError for junk, IsADirectoryError
    except Exception as e:
        raise CheckpointError(f'{path}: refused: not a plain file of tensors and numbers '
                              f'({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:200] if str(e) else ""}); files that '
                              'carry Python objects could run code') from None


def save_file(path, obj):
    """torch.save through a temporary file: a crash never leaves half a checkpoint. Saved through
    a Python file, whose short write on a full disk is an OSError that says so."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
    dataset.write_atomic(path, write)


# What a best.pt must hold to rebuild its model, and what a last.pt adds for --resume.
CHECKPOINT_FIELDS = {'model': dict, 'model_name': str, 'size': int, 'channels': int,
                     'y_mean': float}
RESUME_FIELDS = {'args': dict, 'state': dict, 'optimizer': dict, 'scaler': dict,
                 'torch_rng': torch.Tensor}


def check_checkpoint(ckpt, path, resumable=False):
    """A checkpoint is input like any other file (copied, edited, from another version): every field
    that rebuilds the model is checked here, once, and a bad one named with its file."""
    def refuse(why):
        raise CheckpointError(f'{path}: {why}; use a checkpoint that train.py or cv.py wrote')

    if not isinstance(ckpt, dict):
        refuse('not a checkpoint of this project')
    fields = {**CHECKPOINT_FIELDS, **(RESUME_FIELDS if resumable else {})}
    for field, kind in fields.items():
        if field not in ckpt:
            refuse(f'no {field!r} in it')
        value = ckpt[field]
        wrong = not isinstance(value, kind) or isinstance(value, bool)
        if wrong or (kind is float and not math.isfinite(value)):
            refuse(f'{field} = {str(value)[:50]!r} is not '
                   f'{"a finite number" if kind is float else kind.__name__}')
    if not all(isinstance(v, torch.Tensor) for v in ckpt['model'].values()):
        refuse('its model is not a state dict of tensors')
    name, size = ckpt['model_name'], ckpt['size']
    if name not in MODELS:
        refuse(f'unknown model {name!r} (this project has {", ".join(MODELS)})')
    if not MIN_SIZE[name] <= size <= MAX_SIZE:
        refuse(f'size {size} is outside {MIN_SIZE[name]}..{MAX_SIZE} px')
    if ckpt['channels'] != INPUT_CHANNELS[name]:
        refuse(f'channels {ckpt["channels"]} but a {name} takes {INPUT_CHANNELS[name]}')
    if ckpt.get('bins', 0) not in (0, AGE_BINS):
        refuse(f'bins {ckpt["bins"]!r} is neither 0 (regression) nor {AGE_BINS} (DEX)')
    return ckpt


def load_checkpoint(path, resumable=False):
    """A best.pt (or with resumable=True a last.pt), read safely and checked."""
    return check_checkpoint(load_file(path), path, resumable)


def load_weights_file(path):
    """A state dict from --weights FILE: torchvision's .pth, or one of this project's
    checkpoints."""
    try:
        state = load_file(path)
    except CheckpointError as e:
        raise WeightsError(f'--weights {e}') from None
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        state = {k.removeprefix('backbone.'): v for k, v in state['model'].items()
                 if k.startswith('backbone.')}  # one of our checkpoints: reuse its backbone
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f'--weights {path}: expected a state dict of tensors')
    return state


def imagenet_cache_file():
    """Where torchvision's weights API looks for the ResNet-50 ImageNet weights (torch hub
    cache)."""
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
