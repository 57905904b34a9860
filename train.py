"""Train one age regressor on a person-grouped train/validation split.

    python train.py --demo                                   # synthetic faces, CPU, ~2 minutes
    python clean_data.py --data data/wiki                    # once, for the real data
    python train.py --data data/wiki --model resnet50 --loss smoothl1 --out-dir runs/r50
    python train.py --data data/wiki --model cnn --weights none --epochs 20 --size 64 --device cpu
    python train.py --resume runs/r50                        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data data/wiki    # one run on 4 GPUs (DDP)

The run directory gets best.pt (everything predict.py needs), history.csv, metrics.json,
val_predictions.csv, predictions.png (predicted vs actual) and error_by_decade.png. Ctrl-C or SIGTERM saves last.pt,
from which --resume continues exactly where the run stopped.

The recipe, in the order `fit` reads: build the model and optimizer; then for each epoch
`train_epoch` (augmented batches, AdamW, learning rate warm-up then cosine decay), `evaluate` on
the validation rows, keep the best checkpoint, stop early when it stops improving; finally
`finish` scores the best checkpoint once more and writes the run's files.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw

import clean_data
import dataset
import demo_data
import models

AGE_BINS = 101  # DEX: one class for each age 0..100
DEX_SIGMA = 3.0  # years: the width of DEX's Gaussian soft labels (wiki's ages are noisy by a few years)


class DEXLoss(nn.Module):
    """Cross-entropy of the 101 age logits against a Gaussian around the true age (soft labels);
    the prediction is the softmax's expected value (models.AgeRegressor.ages). Targets come in
    standardised, like those of the regression losses."""

    def __init__(self, y_mean, y_std, sigma=DEX_SIGMA):
        super().__init__()
        self.y_mean, self.y_std, self.sigma = y_mean, y_std, sigma

    def forward(self, logits, y):
        age = y * self.y_std + self.y_mean
        bins = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
        soft = torch.softmax(-(bins - age[:, None]) ** 2 / (2 * self.sigma ** 2), dim=1)
        return -(soft * torch.log_softmax(logits, dim=1)).sum(1).mean()


LOSSES = {'mse': nn.MSELoss, 'smoothl1': nn.SmoothL1Loss, 'l1': nn.L1Loss, 'dex': DEXLoss}
AGE_RANGE = (1.0, 100.0)  # predictions are clipped to the ages the clean data can hold
DEFAULT_SIZE = {'cnn': 64, 'resnet50': 100}
# On 2 CPU cores a cnn step at 64 px handles 1.5x more images per second at batch 32 than at 128
# (cache-sized activations), and takes 4x more steps: 5-fold CV at 1.5 min a run, RMSE 13.60 vs
# 14.46 (README, Results). A GPU needs large batches to be busy.
CPU_BATCH, GPU_BATCH = 32, 128
DEMO_DIR = os.path.join('data', 'demo')


def make_criterion(name, y_mean, y_std):
    """The loss `name` on standardised targets; DEX needs the scale to place its age bins."""
    return LOSSES[name](y_mean, y_std) if name == 'dex' else LOSSES[name]()


# ----------------------------------------------------------------------------- options

def add_train_options(parser):
    """Every option of one training run; cv.py takes the same ones under the same names."""
    parser.add_argument('--data', default='data/wiki', help='Kaggle folder (wiki_labels.csv, wiki_labeled/)')
    parser.add_argument('--csv', help='clean CSV from clean_data.py (default: DATA/wiki_labels_clean.csv)')
    parser.add_argument('--model', default='resnet50', choices=models.MODELS, help='network')
    parser.add_argument('--weights', help='imagenet (torch hub cache), none (from scratch) or a state-dict FILE '
                                          '(default: imagenet for resnet50, none for cnn)')
    parser.add_argument('--loss', default='smoothl1', choices=sorted(LOSSES),
                        help='training loss; dex: 101 age classes, soft labels, the expected age as prediction')
    parser.add_argument('--epochs', type=int, default=30, help='passes over the training rows')
    parser.add_argument('--batch-size', type=int, help=f'images per step, over all GPUs (default: {GPU_BATCH} on a '
                        f'GPU, {CPU_BATCH} on the CPU)')
    parser.add_argument('--lr', type=float, default=1e-3,
                        help='peak AdamW learning rate (warm-up, cosine decay) of the head, and of all layers from scratch')
    parser.add_argument('--backbone-lr', type=float,
                        help='peak learning rate of a pretrained backbone (default: lr/10 with --weights imagenet '
                             'or FILE, else lr)')
    parser.add_argument('--weight-decay', type=float, default=1e-4,
                        help='AdamW weight decay of conv and linear weights (norm layers and biases get none)')
    parser.add_argument('--ema', type=float, default=0.0,
                        help='decay of an exponential moving average of the weights, which is then what is '
                             'validated and saved in best.pt (0: off)')
    parser.add_argument('--no-tta', action='store_true',
                        help='validate without averaging each face with its mirror image (predict.py has its own)')
    parser.add_argument('--size', type=int, help='model input size in pixels; the images are 100x100 '
                                                 '(default: 64 for cnn, 100 for resnet50)')
    parser.add_argument('--no-augment', action='store_true', help='no crop/flip/rotation/colour augmentation')
    parser.add_argument('--balance-gender', action='store_true',
                        help='oversample the rarer gender in the TRAINING part (never in validation)')
    parser.add_argument('--train-min-face-score', type=float, default=1.0,
                        help='train only on rows with at least this face score (#NAME?, no face, is -inf); '
                             'validation keeps every row where a face was found, as the test set does')
    parser.add_argument('--train-keep-second-face', action='store_true',
                        help='also train on rows where a second face was detected (validation always keeps them)')
    parser.add_argument('--train-max-age', type=float, help='also drop training rows older than this')
    parser.add_argument('--train-min-age', type=float, help='also drop training rows younger than this')
    parser.add_argument('--patience', type=int, default=0,
                        help='stop after this many epochs without a better val RMSE; 0: never (with a cosine '
                             'decay the best epochs are the last, so the default runs the schedule to its end)')
    parser.add_argument('--limit', type=int, help='use only N randomly chosen rows (smoke tests)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the split, the initial weights and the draws')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda', 'mps'), help='where to train')
    parser.add_argument('--time-limit', type=float,
                        help='minutes (in cv.py: for each run); stop cleanly after the step that crosses it')
    parser.add_argument('--compile', nargs='?', const='default', metavar='MODE',
                        choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                        help='torch.compile the model (CUDA; a slower start); MODE reduce-overhead adds CUDA graphs')
    parser.add_argument('--log-every', type=int, default=50, help='steps between progress lines')
    parser.add_argument('--demo', action='store_true',
                        help=f'make synthetic data in {DEMO_DIR} if absent and use CPU-sized presets')


def demo_presets(model, runs=1):
    """What --demo sets, for every option the command line leaves out. Sized for a 2-core laptop
    CPU: one train.py run learns the drawn age cues in about two minutes, and cv.py's `runs`
    (combinations x folds) runs share about four minutes."""
    # ResNet-50's steps at 32 px are too small to keep the cores busy: on 2 cores batch 48 trains
    # 1.3x the images per second of batch 32 (116 vs 91), on one core 1.4x (70 vs 50).
    presets = dict(data=DEMO_DIR, model=model, weights='none', lr=2e-3,
                   batch_size={'cnn': 32, 'resnet50': 48}[model], size={'cnn': 64, 'resnet50': 32}[model],
                   epochs=25, time_limit=2.5)
    if runs > 1:
        presets.update(epochs=10, time_limit=round(4.0 / runs, 2))
    return presets


def check_args(parser, args):
    """Impossible values are argparse errors (exit code 2), before anything is loaded."""
    positive = ['epochs', 'batch_size', 'lr', 'backbone_lr', 'size', 'log_every']
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if args.weight_decay < 0:
        parser.error(f'--weight-decay must be >= 0, got {args.weight_decay}')
    if args.patience < 0:
        parser.error(f'--patience must be >= 0, got {args.patience}')
    if not 0 <= args.ema < 1:
        parser.error(f'--ema must be in [0, 1), got {args.ema}')
    if args.size < models.MIN_SIZE[args.model]:
        parser.error(f'--size {args.size} is too small for {args.model} (at least {models.MIN_SIZE[args.model]})')
    if args.limit is not None and args.limit < 4:
        parser.error(f'--limit must be at least 4, got {args.limit}')
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f'--time-limit must be positive minutes, got {args.time_limit}')


def parse_args(parser, argv=None, count_runs=None):
    """Parse, fill in the --demo presets and the weights default, check. count_runs(args): how many
    runs the command makes (cv.py), so that a demo fits its time."""
    args = parser.parse_args(argv)
    if args.demo:  # the presets become defaults, so every flag on the command line still wins
        parser.set_defaults(model='cnn')
        model = parser.parse_args(argv).model
        parser.set_defaults(**demo_presets(model, count_runs(args) if count_runs else 1))
        args = parser.parse_args(argv)
    if args.weights is None:
        args.weights = 'imagenet' if args.model == 'resnet50' else 'none'
    if args.size is None:  # the cnn learns more per CPU-second at 64 px (README, Results)
        args.size = DEFAULT_SIZE[args.model]
    if args.batch_size is None:
        on_gpu = args.device in ('cuda', 'mps') or (args.device == 'auto' and pick_device('auto').type != 'cpu')
        args.batch_size = GPU_BATCH if on_gpu else CPU_BATCH
    check_args(parser, args)
    return args


# ----------------------------------------------------------------------------- metrics

def metric_sums(pred, y):
    """Squared error, absolute error, count, sum of y, sum of y^2: add these over batches."""
    pred, y = pred.double(), y.double()
    err = pred - y
    return torch.stack([(err * err).sum(), err.abs().sum(), torch.tensor(float(len(y)), dtype=torch.float64,
                        device=y.device), y.sum(), (y * y).sum()])


def metrics_from_sums(sums):
    sse, sae, n, sy, syy = (float(v) for v in sums)
    total = syy - sy * sy / n  # sum of squares around the mean
    return {'rmse': math.sqrt(sse / n), 'mae': sae / n, 'r2': 1 - sse / total if total > 0 else float('nan'),
            'n': int(n)}


# ----------------------------------------------------------------------------- device, data

class CheckpointError(Exception):
    """A checkpoint that is missing, refused or does not fit: the message names the file."""


class Diverged(Exception):
    """The loss or the validation error stopped being a finite number."""


def error(message):
    """Data and runtime errors: one line on stderr; the caller returns exit code 1."""
    print(f'error: {message}', file=sys.stderr, flush=True)


def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit('error: --device mps but this torch has no MPS support')
    return torch.device(name)


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
        else:
            device = torch.device('cpu')
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def load_table(args, log=print):
    """The clean table and its decoded images (cached); rows whose image cannot be read are dropped
    with a count. --demo makes and cleans the synthetic data first."""
    if args.demo and not os.path.exists(os.path.join(args.data, 'wiki_labels.csv')):
        log(f'making synthetic demo data in {args.data}')
        demo_data.make_demo_data(args.data)
    csv = args.csv or os.path.join(args.data, 'wiki_labels_clean.csv')
    if args.demo and not os.path.exists(csv):
        clean_data.main(['--data', args.data, '--out', csv])
    if not os.path.exists(csv):
        raise dataset.DataError(f'{csv} not found: run `python clean_data.py --data {args.data}` first '
                                '(or pass --csv FILE)')
    files = dataset.find_files(args.data)
    dataset.require(files, args.data, 'images')
    table = dataset.read_clean(csv)
    images, ok = dataset.load_images(csv, table, files['images'], log)
    if not ok.all():
        bad = table['ID'][~ok].tolist()
        log(f'warning: skipping {len(bad)} row(s) whose image cannot be read, IDs {bad[:10]}'
            f'{" ..." if len(bad) > 10 else ""} (clean_data.py removes them)')
        table, images = table[ok].reset_index(drop=True), images[ok]
    if args.limit and args.limit < len(table):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(table), args.limit, replace=False))
        table, images = table.iloc[keep].reset_index(drop=True), images[keep]
    return table, images


def load_table_once(args, rank, world, log=print):
    """Under torchrun, rank 0 makes the demo data and the image cache; the others then read them."""
    if rank == 0:
        loaded = load_table(args, log)
    if world > 1:
        dist.barrier()
    if rank != 0:
        loaded = load_table(args, log)
    return loaded


def prepare_images(images, device, log=print):
    """The whole uint8 array on the GPU when it fits (0.6 GB for 60K faces), else in host memory
    (each batch is then gathered on the CPU and copied over)."""
    images = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() < free / 4:
            return images.to(device)
        log(f'images ({images.numel() / 1e9:.1f} GB) stay in host memory: the GPU has {free / 1e9:.1f} GB free')
        return images
    return images.to(device)


def training_rows(table, rows, args):
    """The training part of a split, filtered by the --train-* options (validation never is)."""
    rules = clean_data.metadata_rules(
        table.iloc[rows], min_face_score=args.train_min_face_score, drop_second_face=not args.train_keep_second_face,
        min_age=-math.inf if args.train_min_age is None else args.train_min_age,
        max_age=math.inf if args.train_max_age is None else args.train_max_age)
    bad = np.zeros(len(rows), dtype=bool)
    for mask in rules.values():
        bad |= mask
    return rows[~bad]


def validation_rows(table, folds, k):
    """Fold k's test-like rows (a face found, a possible age): what validation scores. Rows without
    a face are in no validation set, as the test set has almost none."""
    return np.flatnonzero((folds == k) & clean_data.test_like(table))


def sample_weights(gender):
    """--balance-gender: male and female rows get equal total weight; unknown gender keeps its share."""
    gender = np.asarray(gender, dtype=float)
    w = np.ones(len(gender))
    male, female = gender == 1, gender == 0
    known = male.sum() + female.sum()
    if male.any() and female.any():
        w[male] = known / 2 / male.sum()
        w[female] = known / 2 / female.sum()
    return torch.from_numpy(w)


def epoch_order(n, weights, seed, epoch):
    """Row positions for one epoch: a permutation, or a weighted draw with replacement.
    Seeded by (seed, epoch) alone, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        return torch.randperm(n, generator=g)
    return torch.multinomial(weights, n, replacement=True, generator=g)


def channels_last(device):
    """Channels-last memory (NHWC) on CUDA, where cuDNN's fastest convolutions read it, and on the
    CPU, where oneDNN's do: measured on 2 CPU cores, a training step of the cnn at 64 px ran 1.30x
    faster (178 -> 232 images/s), and on one core resnet50's 1.20x at 100 px (0.95x at the demo's
    32 px). Left off elsewhere (MPS)."""
    return device.type in ('cuda', 'cpu')


def model_input(x_u8, size, channels, device, generator=None, flip=False):
    """A gathered uint8 batch on `device` -> the model's input: dataset.to_model_input, then
    channels-last memory where the model uses it."""
    x = dataset.to_model_input(x_u8, size, channels, generator=generator, flip=flip)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device) else x


# ----------------------------------------------------------------------------- prediction

def autocast(device):
    """bf16 where the GPU has it: same range as fp32, so no loss scaling; fp16 (scaled) otherwise."""
    if device.type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast('cuda', dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def eval_batch(train_batch, device):
    """Images per evaluation batch: no gradients are kept and each layer's activations are freed as
    the next is computed, so on a GPU it can be large, which saves kernel launches; on the CPU
    larger batches only leave the caches."""
    return max(2 * train_batch, 1024) if device.type == 'cuda' else 2 * train_batch


@torch.inference_mode()
def predict(model, images, rows, size, channels, batch_size, device, tta=False):
    """Ages in years for images[rows]: the evaluation path of train.py, cv.py and predict.py.
    tta=True averages each image with its mirror image."""
    model.eval()
    out = []
    rows = torch.as_tensor(rows)
    views = (False, True) if tta else (False,)
    for start in range(0, len(rows), batch_size):
        x_u8 = images.index_select(0, rows[start:start + batch_size].to(images.device)).to(device, non_blocking=True)
        total = 0
        for flip in views:
            with autocast(device):
                total = total + model.ages(model(model_input(x_u8, size, channels, device, flip=flip)))
        out.append((total / len(views)).clamp(*AGE_RANGE))
    return torch.cat(out).float().cpu() if out else torch.empty(0)


def plot_predictions(path, y, pred, title):
    """Predicted vs actual age as a PNG drawn with Pillow: axes, ticks, identity line, RMSE, R^2."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    m = metrics_from_sums(metric_sums(torch.tensor(pred), torch.tensor(y)))
    W, H, L, B, T, R = 640, 640, 70, 60, 50, 20
    lo, hi = 0.0, max(100.0, float(np.ceil(max(y.max(), pred.max()) / 10) * 10))
    im = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(im)

    def px(a, p):
        return L + (a - lo) / (hi - lo) * (W - L - R), H - B - (p - lo) / (hi - lo) * (H - B - T)

    d.rectangle([L, T, W - R, H - B], outline='black')
    for t in np.arange(lo, hi + 1, 10):
        x, _ = px(t, lo)
        _, yy = px(lo, t)
        d.line([x, H - B, x, H - B + 5], fill='black')
        d.text((x - 8, H - B + 8), f'{t:g}', fill='black')
        d.line([L - 5, yy, L, yy], fill='black')
        d.text((L - 30, yy - 6), f'{t:g}', fill='black')
    d.line([*px(lo, lo), *px(hi, hi)], fill=(200, 0, 0), width=2)  # perfect prediction
    for a, p in zip(y, pred):
        x, yy = px(a, p)
        d.ellipse([x - 2, yy - 2, x + 2, yy + 2], fill=(30, 90, 200))
    d.text((L, 12), title, fill='black')
    d.text((L, 28), f'RMSE {m["rmse"]:.2f}  MAE {m["mae"]:.2f}  R^2 {m["r2"]:.3f}  n={m["n"]}', fill='black')
    d.text(((W + L) / 2 - 40, H - 25), 'actual age', fill='black')
    d.text((5, T - 20), 'predicted age', fill='black')
    dataset.write_atomic(path, lambda tmp: im.save(tmp))


def decades(age):
    """Age decade of each true age: 0 for 0-9 years ... 9 for 90 and over."""
    return np.minimum(np.asarray(age, float) // 10, 9).astype(int)


def rmse_by_decade(age, pred):
    """{'0-9': {'rmse': ..., 'n': ...}, ...} for the decades that hold at least one face: where a
    model fails (children and the old, usually)."""
    age, pred, decade = np.asarray(age, float), np.asarray(pred, float), decades(age)
    return {(f'{d * 10}-{d * 10 + 9}' if d < 9 else '90+'): {
        'rmse': float(np.sqrt(np.mean((pred[decade == d] - age[decade == d]) ** 2))), 'n': int((decade == d).sum())}
        for d in range(10) if (decade == d).any()}


def plot_error_by_decade(path, age, pred, title):
    """RMSE in each decade of the true age, with the face count on each bar, drawn with Pillow."""
    by_decade = rmse_by_decade(age, pred)
    W, H, L, B, T = 640, 400, 60, 50, 50
    top = max(5.0, np.ceil(max(v['rmse'] for v in by_decade.values()) / 5) * 5)
    im = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(im)
    d.line([L, T, L, H - B, W - 20, H - B], fill='black')
    for t in np.arange(0, top + 1, 5):
        y = H - B - t / top * (H - B - T)
        d.line([L - 5, y, L, y], fill='black')
        d.text((L - 30, y - 6), f'{t:g}', fill='black')
    bar = (W - 20 - L) / 10
    for k in range(10):
        x0 = L + k * bar + 4
        name = f'{k * 10}-{k * 10 + 9}' if k < 9 else '90+'
        d.text((x0, H - B + 6), name, fill='black')
        if name in by_decade:
            y = H - B - by_decade[name]['rmse'] / top * (H - B - T)
            d.rectangle([x0, y, x0 + bar - 8, H - B], fill=(30, 90, 200))
            d.text((x0, y - 14), f'n={by_decade[name]["n"]}', fill='black')
    d.text((L, 12), title, fill='black')
    d.text((L, 28), 'RMSE (years) by true age', fill='black')
    dataset.write_atomic(path, lambda tmp: im.save(tmp))


def collapse_warning(age, pred):
    """A warning when the predictions hardly vary (sd under a third of the true ages' sd): the
    classic failure on wiki faces, one age for everyone. None when they vary enough."""
    spread, truth = float(np.std(pred)), float(np.std(age))
    if len(age) < 2 or spread >= truth / 3:
        return None
    return (f'warning: the predictions hardly vary (sd {spread:.1f} years, the true ages {truth:.1f}): the model '
            f'has collapsed towards the mean age {float(np.mean(pred)):.1f}. Usual causes: too few epochs or a '
            'learning rate far too high or too low, a model that did not train (see history.csv), or faces framed '
            'unlike the training crops')


# ----------------------------------------------------------------------------- the parts of training

def lr_factor(step, total_steps, warmup_steps, time_fraction=0.0):
    """The learning rate at `step` (from 0) as a fraction of the peak: a linear warm-up over
    warmup_steps, then a cosine decay that reaches zero at total_steps. Under --time-limit the run
    is as far along as the larger of its step and its time fraction, so a run that fits fewer
    steps than total_steps still finishes its warm-up and decay at the limit."""
    step = min(max(step, time_fraction * total_steps), total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def warmup_steps(total_steps, steps_per_epoch):
    """A tenth of the run, at most three epochs."""
    return min(total_steps // 10, 3 * steps_per_epoch)


def build_model(args, y_mean, y_std, device, world=1):
    """(raw_model, model): the plain model, which is saved and evaluated, and the one the training
    steps call, wrapped for DDP and torch.compile when asked."""
    torch.manual_seed(args.seed)  # the initial weights, and later dropout, draw from the global generator
    raw_model = models.build_model(args.model, args.weights, y_mean, max(y_std, 1e-3),
                                   bins=AGE_BINS if args.loss == 'dex' else 0).to(device)
    if channels_last(device):
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model, mode=args.compile)
    return raw_model, model


def backbone_lr(args):
    """A pretrained backbone learns 10x slower than the new head (fine-tuning, as the CVPR 2024
    age benchmark does: 1e-4 against 1e-3 from scratch); from scratch all layers share --lr."""
    if args.backbone_lr:
        return args.backbone_lr
    return args.lr / 10 if args.weights not in (None, 'none') else args.lr


def build_optimizer(model, args, device):
    """AdamW (its fused kernel on CUDA and on the CPU, where it cut ResNet-50's optimizer step from
    99 to 27 ms on 2 cores) and the loss scaler, which only fp16 needs. Four parameter
    groups: the head and the backbone, each split into conv/linear weights, which decay, and
    norm-layer weights and biases, which do not (decaying those only shrinks what normalisation
    sets, as nanoGPT's optimizer set-up notes)."""
    head = {id(p) for m in model.modules() if isinstance(m, models.FP32Linear) for p in m.parameters()}
    grouped = {}
    for p in model.parameters():
        grouped.setdefault((id(p) in head, p.dim() >= 2), []).append(p)
    groups = [{'params': params, 'lr': args.lr if is_head else backbone_lr(args), 'initial_lr':
               args.lr if is_head else backbone_lr(args), 'weight_decay': args.weight_decay if decays else 0.0}
              for (is_head, decays), params in grouped.items()]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda' and not torch.cuda.is_bf16_supported())
    return optimizer, scaler


def set_lr(optimizer, factor):
    for group in optimizer.param_groups:
        group['lr'] = group['initial_lr'] * factor


def train_step(model, optimizer, scaler, criterion, x, y):
    """Forward, loss, backward, optimizer step. Returns the loss as a tensor (no GPU sync)."""
    with autocast(x.device):
        out = model(x)
    loss = criterion(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@dataclasses.dataclass
class Run:
    """What one training run works with. `state` is the part that --resume restores."""
    args: argparse.Namespace
    raw_model: nn.Module             # saved, evaluated and restored
    model: nn.Module                 # what the training steps call (DDP or compiled, else raw_model)
    optimizer: torch.optim.Optimizer
    ema: torch.optim.swa_utils.AveragedModel  # the averaged weights (--ema), else None
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    aug: torch.Generator             # augmentation draws; None with --no-augment
    images: torch.Tensor             # uint8 (N, 100, 100), on the device when it fits
    ages: torch.Tensor               # float, next to the images
    table: pd.DataFrame
    train_rows: torch.Tensor
    val_rows: np.ndarray
    val_clean: np.ndarray            # which validation rows the old cleaning kept: scored apart too
    weights: torch.Tensor            # --balance-gender draw weights, else None
    y_mean: float
    y_std: float
    channels: int
    per_rank: int                    # images per step in each process
    steps_per_epoch: int
    total_steps: int                 # epochs x steps_per_epoch: where the learning rate reaches zero
    warmup: int
    out_dir: str
    device: torch.device
    rank: int
    world: int
    log: callable
    state: dict = dataclasses.field(default_factory=lambda: {
        'epoch': 0, 'step': 0,            # where training continues from
        'best_val_rmse': math.inf, 'best_epoch': -1, 'bad_epochs': 0,
        'history': [],                    # one row per epoch, written to history.csv
        'loss_sum': 0.0, 'loss_count': 0,  # the current epoch's training loss so far
        'train_images': 0, 'train_seconds': 0.0})


def build_run(args, images, table, train_rows, val_rows, out_dir, device, rank, world, log):
    ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
    train_rows = torch.as_tensor(train_rows)
    y_train = ages[train_rows.to(ages.device)]
    y_mean, y_std = float(y_train.mean()), float(y_train.std()) if len(train_rows) > 1 else 1.0
    raw_model, model = build_model(args, y_mean, y_std, device, world)
    optimizer, scaler = build_optimizer(raw_model, args, device)
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            raw_model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
    per_rank = max(1, args.batch_size // world)
    steps_per_epoch = max(1, len(train_rows) // world // per_rank)
    total = args.epochs * steps_per_epoch
    weights = sample_weights(table['gender'].to_numpy()[train_rows.numpy()]) if args.balance_gender else None
    criterion = make_criterion(args.loss, y_mean, y_std)
    val_rows = np.asarray(val_rows, dtype=np.int64)
    val_clean = clean_data.clean_only(table.iloc[val_rows])
    return Run(args, raw_model, model, optimizer, ema, scaler, criterion,
               None if args.no_augment else torch.Generator(device=device), images, ages, table, train_rows,
               val_rows, val_clean, weights, y_mean, y_std, models.INPUT_CHANNELS[args.model], per_rank,
               steps_per_epoch, total, warmup_steps(total, steps_per_epoch), out_dir, device, rank, world, log)


def evaluated_model(run):
    """The model that is validated and saved in best.pt: the moving average with --ema."""
    return run.ema.module if run.ema is not None else run.raw_model


def agree(run, flag):
    """Every process must stop at the same step: true on all when true on any."""
    if run.world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def summed_loss(run, loss_sum, epoch, from_step, to_step):
    """The summed training loss over all processes, as a number (a GPU sync: called at log steps).
    A NaN/inf stops the run, naming the epoch and the steps since the last check."""
    if run.world > 1:
        loss_sum = loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    total = float(loss_sum)
    if not math.isfinite(total):
        where = f'step {to_step}' if from_step == to_step else f'steps {from_step}-{to_step}'
        raise Diverged(f'the loss became NaN/inf at epoch {epoch + 1} {where}; stopping. The last good '
                       f'checkpoint is kept in {run.out_dir} (try a lower --lr).')
    return total


def train_epoch(run, epoch, start, deadline):
    """One epoch of training, from run.state['step'] (not 0 when resumed mid-epoch).
    Returns (mean training loss, images/s, why it stopped: 'completed', 'time_limit' or 'signal')."""
    args, state = run.args, run.state
    order = epoch_order(len(run.train_rows), run.weights, args.seed, epoch)
    order = run.train_rows[order[run.rank::run.world]].to(run.images.device)  # indices live with the images
    if state['step'] == 0:  # a fresh epoch, not one resumed mid-way
        if run.aug is not None:
            run.aug.manual_seed(args.seed * 1_000_003 + epoch * 101 + run.rank)
        state.update(loss_sum=0.0, loss_count=0)
    run.model.train()
    first = done = checked = state['step']
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no GPU sync per step
    t0 = tick = time.time()
    stopped, total = 'completed', 0.0
    for step in range(first, run.steps_per_epoch):
        idx = order[step * run.per_rank:(step + 1) * run.per_rank]
        x = model_input(run.images.index_select(0, idx).to(run.device, non_blocking=True), args.size, run.channels,
                        run.device, generator=run.aug)
        y = (run.ages[idx.to(run.ages.device)].to(run.device, non_blocking=True) - run.y_mean) / run.y_std
        time_fraction = (time.time() - start) / (deadline - start) if deadline else 0.0
        set_lr(run.optimizer, lr_factor(epoch * run.steps_per_epoch + step, run.total_steps, run.warmup, time_fraction))
        loss_sum += train_step(run.model, run.optimizer, run.scaler, run.criterion, x, y)
        if run.ema is not None:
            run.ema.update_parameters(run.raw_model)
        done = step + 1
        log_step = done % args.log_every == 0 or done == run.steps_per_epoch
        if log_step:
            total = summed_loss(run, loss_sum, epoch, checked + 1, done)
            now = time.time()
            speed = (done - checked) * run.per_rank * run.world / max(now - tick, 1e-9)
            left = ((args.epochs - epoch) * run.steps_per_epoch - done) * run.per_rank * run.world / max(speed, 1e-9)
            run.log(f'epoch {epoch + 1}/{args.epochs} step {done}/{run.steps_per_epoch} '
                    f'loss {(state["loss_sum"] + total) / (state["loss_count"] + done - first):.4f} '
                    f'lr {run.optimizer.param_groups[0]["lr"]:.2e} {speed:.0f} img/s elapsed {fmt_time(now - start)} '
                    f'left ~{fmt_time(min(left, deadline - now) if deadline else left)}')
            tick, checked = now, done
        if run.world == 1 or log_step:  # with several processes, agree on stopping at log steps only
            if agree(run, Stop.signal is not None):
                stopped = 'signal'
            elif deadline and agree(run, time.time() > deadline):
                stopped = 'time_limit'
        if stopped != 'completed':
            break
    # Fold this session's part of the epoch into the state (what last.pt and the history keep).
    if done > checked:  # steps since the last log step (at a log step, `total` is up to date)
        total = summed_loss(run, loss_sum, epoch, checked + 1, done)
    state.update(step=done, loss_sum=state['loss_sum'] + total, loss_count=state['loss_count'] + done - first,
                 train_images=state['train_images'] + (done - first) * run.per_rank * run.world,
                 train_seconds=state['train_seconds'] + time.time() - t0)
    mean_loss = state['loss_sum'] / max(state['loss_count'], 1)
    return mean_loss, state['train_images'] / max(state['train_seconds'], 1e-9), stopped


def evaluate(run):
    """Validation metrics and predictions. Process 0 evaluates (its model is the one saved in
    best.pt) and sends the metrics to the others, so every process makes the same decisions."""
    metrics, pred = None, None
    if run.rank == 0:
        pred = predict(evaluated_model(run), run.images, run.val_rows, run.args.size, run.channels,
                       eval_batch(run.per_rank, run.device), run.device, tta=not run.args.no_tta)
        y = torch.as_tensor(run.table['age'].to_numpy()[run.val_rows])
        metrics = metrics_from_sums(metric_sums(pred, y))
        clean = torch.as_tensor(run.val_clean)
        metrics['rmse_clean'] = metrics_from_sums(metric_sums(pred[clean], y[clean]))['rmse'] if clean.any() else math.nan
    if run.world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    if not math.isfinite(metrics['rmse']):
        raise Diverged(f'the validation RMSE is not finite after epoch {run.state["epoch"] + 1}; '
                       'stopping (try a lower --lr)')
    return metrics, pred


# ----------------------------------------------------------------------------- checkpoints

def checkpoint(run, kind):
    """best.pt: the model and what predict.py needs to rebuild it. last.pt: also everything that
    --resume needs to continue exactly (optimizer, schedule, counters, random generators)."""
    ckpt = {'model_name': run.args.model, 'size': run.args.size, 'channels': run.channels,
            'bins': AGE_BINS if run.args.loss == 'dex' else 0, 'args': vars(run.args), 'y_mean': run.y_mean,
            'y_std': run.y_std}
    if kind == 'best':
        return {**ckpt, 'model': evaluated_model(run).state_dict(), 'epoch': run.state['best_epoch'],
                'val_rmse': run.state['best_val_rmse']}
    return {**ckpt, 'model': run.raw_model.state_dict(), 'optimizer': run.optimizer.state_dict(),
            'ema': run.ema.state_dict() if run.ema is not None else None,
            'scaler': run.scaler.state_dict(), 'state': dict(run.state),
            'device_type': run.device.type, 'torch_rng': torch.get_rng_state(),
            'aug_rng': run.aug.get_state() if run.aug is not None else None,
            'cuda_rng': torch.cuda.get_rng_state(run.device) if run.device.type == 'cuda' else None}


def save(path, obj):
    dataset.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """weights_only=True: tensors, numbers, strings, lists and dicts only. A file that carries a
    pickled object (one that could run code when loaded) is refused and nothing in it runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: checkpoint not found') from None
    except Exception as e:
        raise CheckpointError(f'{path}: refused: not a plain checkpoint of tensors and numbers '
                              f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None


def restore(run, resume):
    """Continue from a last.pt. The device may differ from the one that saved it: tensors are
    loaded on the CPU and moved, but a random generator's state only fits a generator of the same
    kind of device (a CUDA one is 16 bytes, a CPU one 5,056), so then the draws are seeded afresh."""
    run.raw_model.load_state_dict(resume['model'])
    run.optimizer.load_state_dict(resume['optimizer'])
    if run.ema is not None:
        run.ema.load_state_dict(resume['ema'])
    if resume['scaler']:  # empty when saved by a disabled scaler (CPU, bf16)
        run.scaler.load_state_dict(resume['scaler'])
    run.state.update(resume['state'])
    torch.set_rng_state(resume['torch_rng'])  # dropout draws from the global generator on CPUs
    same_device = resume.get('device_type', run.device.type) == run.device.type
    try:
        if same_device and run.aug is not None:
            run.aug.set_state(resume['aug_rng'])
        if same_device and run.device.type == 'cuda':
            torch.cuda.set_rng_state(resume['cuda_rng'], run.device)
    except (RuntimeError, TypeError):  # a checkpoint from before device_type was saved
        same_device = False
    if not same_device:
        if run.aug is not None:
            run.aug.manual_seed(run.args.seed * 1_000_003 + run.state['epoch'] * 101 + run.state['step'] * 7 + run.rank)
        run.log(f'warning: last.pt was saved on {resume.get("device_type", "another device")}, this run goes on on '
                f'{run.device.type}: the same weights, optimizer and schedule, but other random draws '
                '(augmentation, dropout) than an uninterrupted run')
    run.log(f'resumed at epoch {run.state["epoch"] + 1} step {run.state["step"]} '
            f'(best val RMSE {run.state["best_val_rmse"]:.3f})')


class Stop:
    """While training, Ctrl-C / SIGTERM set a flag and the loop saves a resumable checkpoint at the
    end of the step; a second Ctrl-C gives up at once. Outside training they act as usual."""
    signal = None

    @classmethod
    @contextlib.contextmanager
    def catching(cls):
        def handler(signum, frame):
            if cls.signal is not None:
                raise KeyboardInterrupt
            cls.signal = signum
            print(f'\n{signal.Signals(signum).name}: stopping after this step, saving last.pt ...', flush=True)
        cls.signal = None
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------- the recipe

def fit(args, images, table, train_rows, val_rows, out_dir, device, rank=0, world=1, resume=None, log=print):
    """Train on images[train_rows], validate on images[val_rows] every epoch, keep the best.

    images: uint8 tensor (N, 100, 100), on `device` when it fits (no copy per batch) or on the CPU.
    Returns a dict of final metrics. Raises Diverged on a NaN/inf loss, SystemExit after a signal."""
    run = build_run(args, images, table, train_rows, val_rows, out_dir, device, rank, world, log)
    state = run.state
    if resume is not None:
        restore(run, resume)
    start = time.time()
    epochs_before = len(state['history'])  # a resumed run estimates time left from its own epochs
    deadline = start + args.time_limit * 60 if args.time_limit else None
    log(f'training {args.model} on {len(train_rows)} images, validating on {len(val_rows)} '
        f'({run.steps_per_epoch} steps/epoch x {args.epochs} epochs, batch {run.per_rank * world}, device {device}'
        f'{f", {world} processes" if world > 1 else ""}); peak learning rate {args.lr:g}'
        f'{f" (head), {backbone_lr(args):g} (pretrained backbone)" if backbone_lr(args) != args.lr else ""}, '
        f'loss {args.loss}{f", EMA {args.ema:g}" if args.ema else ""}, validation TTA {"off" if args.no_tta else "on"}')
    stopped = 'completed'
    with Stop.catching():
        while state['epoch'] < args.epochs and stopped == 'completed':
            epoch = state['epoch']
            train_loss, img_per_s, stopped = train_epoch(run, epoch, start, deadline)
            if stopped == 'signal':
                if rank == 0:
                    save(os.path.join(out_dir, 'last.pt'), checkpoint(run, 'last'))
                    log(f'saved {os.path.join(out_dir, "last.pt")} at epoch {epoch + 1} step {state["step"]}; '
                        f'continue with: python train.py --resume {out_dir}')
                raise SystemExit(128 + (Stop.signal or signal.SIGINT))  # another process may have had it
            if len(run.val_rows):
                metrics, _ = evaluate(run)
                improved = metrics['rmse'] < state['best_val_rmse']
            else:  # --val-frac 0: nothing to choose by, so the latest model is the one kept
                metrics, improved = {'rmse': math.nan, 'mae': math.nan, 'r2': math.nan, 'rmse_clean': math.nan}, True
            if stopped == 'completed':
                state['epoch'] += 1
            state['step'] = 0
            state['history'].append({'epoch': epoch + 1, 'train_loss': train_loss, 'val_rmse': metrics['rmse'],
                                     'val_mae': metrics['mae'], 'val_r2': metrics['r2'],
                                     'val_rmse_clean': metrics.get('rmse_clean', math.nan),
                                     'lr': run.optimizer.param_groups[0]['lr'], 'img_per_s': img_per_s,
                                     'seconds': time.time() - start})
            if improved:
                state.update(best_val_rmse=metrics['rmse'], best_epoch=epoch + 1, bad_epochs=0)
            else:
                state['bad_epochs'] += 1
            if rank == 0:
                log_epoch(run, epoch, improved, epochs_before, deadline)
                if improved:
                    save(os.path.join(out_dir, 'best.pt'), checkpoint(run, 'best'))
                dataset.write_csv(pd.DataFrame(state['history']), os.path.join(out_dir, 'history.csv'))
                if stopped == 'completed' and state['epoch'] < args.epochs:
                    save(os.path.join(out_dir, 'last.pt'), checkpoint(run, 'last'))
            if stopped == 'completed' and args.patience and state['bad_epochs'] >= args.patience:
                stopped = 'early_stop'
                log(f'early stop: no better val RMSE for {args.patience} epochs')
    if stopped == 'time_limit':
        log(f'time limit of {args.time_limit:g} min reached')
    return finish(run, stopped, start)


def log_epoch(run, epoch, improved, epochs_before, deadline):
    row = run.state['history'][-1]
    left = (run.args.epochs - epoch - 1) * row['seconds'] / max(len(run.state['history']) - epochs_before, 1)
    if deadline:
        left = min(left, deadline - time.time())
    run.log(f'epoch {epoch + 1}/{run.args.epochs} train_loss {row["train_loss"]:.4f} val_rmse {row["val_rmse"]:.3f} '
            f'val_mae {row["val_mae"]:.3f} val_r2 {row["val_r2"]:.3f} (clean rows {row["val_rmse_clean"]:.3f}) '
            f'{row["img_per_s"]:.0f} img/s '
            f'elapsed {fmt_time(row["seconds"])} left ~{fmt_time(left)}{"  *best" if improved else ""}')


def finish(run, stopped, start):
    """Score the best checkpoint once more and write the run's files: metrics.json (with the RMSE
    per age decade), val_predictions.csv, predictions.png, error_by_decade.png. last.pt goes: the
    run is complete."""
    state, out_dir = run.state, run.out_dir
    if not len(run.val_rows):  # --val-frac 0
        result = {'val_rmse': None, 'best_epoch': state['best_epoch'], 'epochs_run': len(state['history']),
                  'stopped': stopped, 'train_img_per_s': state['train_images'] / max(state['train_seconds'], 1e-9),
                  'seconds': time.time() - start, 'n_train': len(run.train_rows), 'n_val': 0,
                  'device': str(run.device), 'world_size': run.world, 'model': run.args.model, 'size': run.args.size}
        if run.rank == 0:
            dataset.write_json(result, os.path.join(out_dir, 'metrics.json'))
            if os.path.exists(os.path.join(out_dir, 'last.pt')):
                os.remove(os.path.join(out_dir, 'last.pt'))
        return result
    if run.rank == 0:
        evaluated_model(run).load_state_dict(load_checkpoint(os.path.join(out_dir, 'best.pt'))['model'])
    metrics, pred = evaluate(run)
    result = {'val_rmse': metrics['rmse'], 'val_mae': metrics['mae'], 'val_r2': metrics['r2'],
              'val_rmse_clean': metrics['rmse_clean'], 'n_val_clean': int(run.val_clean.sum()),
              'best_epoch': state['best_epoch'], 'epochs_run': len(state['history']), 'stopped': stopped,
              'train_img_per_s': state['train_images'] / max(state['train_seconds'], 1e-9),
              'seconds': time.time() - start, 'n_train': len(run.train_rows), 'n_val': len(run.val_rows),
              'device': str(run.device), 'world_size': run.world, 'model': run.args.model, 'size': run.args.size}
    if run.rank == 0:
        ages = run.table['age'].to_numpy()[run.val_rows]
        val = pd.DataFrame({'ID': run.table['ID'].to_numpy()[run.val_rows], 'age': ages, 'prediction': pred.numpy()})
        dataset.write_csv(val, os.path.join(out_dir, 'val_predictions.csv'))
        title = f'{run.args.model}, validation, best epoch {state["best_epoch"]}'
        plot_predictions(os.path.join(out_dir, 'predictions.png'), val['age'], val['prediction'], title)
        plot_error_by_decade(os.path.join(out_dir, 'error_by_decade.png'), val['age'], val['prediction'], title)
        dataset.write_json({**result, 'rmse_by_decade': rmse_by_decade(ages, pred.numpy())},
                           os.path.join(out_dir, 'metrics.json'))
        warning = collapse_warning(ages, pred.numpy())
        if warning:
            run.log(warning)
        if os.path.exists(os.path.join(out_dir, 'last.pt')):
            os.remove(os.path.join(out_dir, 'last.pt'))
    result['val_pred'] = pred
    return result


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=dataset.HelpFormatter)
    add_train_options(parser)
    parser.add_argument('--val-frac', type=float, default=0.2,
                        help='validation share, grouped by person (1/round(1/val_frac) of the people); 0: train '
                             'the final model on every row for --epochs, with no validation')
    parser.add_argument('--out-dir', help='run directory (default: runs/MODEL-LOSS-DATE-TIME, or runs/demo-DATE-TIME)')
    parser.add_argument('--resume', metavar='RUN_DIR',
                        help='continue the run saved in RUN_DIR/last.pt with its saved options '
                             '(only --device, --time-limit and --log-every may change)')
    args = parse_args(parser, argv)
    if not 0 <= args.val_frac <= 0.5:
        parser.error(f'--val-frac must be in [0, 0.5], got {args.val_frac}')
    if args.resume:
        last = os.path.join(args.resume, 'last.pt')
        if not os.path.exists(last):
            done = os.path.exists(os.path.join(args.resume, 'metrics.json'))
            parser.error(f'--resume {args.resume}: ' + ('the run finished (metrics.json is there)' if done
                                                        else 'no last.pt to resume from'))
        try:
            resume = load_checkpoint(last)
            saved = dict(resume['args'])
        except (CheckpointError, KeyError, TypeError) as e:
            error(f'--resume {args.resume}: {last} cannot be resumed from ({e})')
            return 1
        for key in ('device', 'time_limit', 'log_every'):  # these may change between sessions
            saved[key] = getattr(args, key)
        args = argparse.Namespace(**{**saved, 'resume': args.resume, 'out_dir': args.resume})
    else:
        resume = None
        name = 'demo' if args.demo else f'{args.model}-{args.loss}'
        args.out_dir = args.out_dir or os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
        if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
            parser.error(f'--out-dir {args.out_dir} already holds a run; choose a new --out-dir, '
                         f'or continue it with --resume {args.out_dir}')
    try:
        with distributed(args.device) as (rank, world, device):
            if world > 1:  # the ranks may have stamped their default --out-dir a second apart: use rank 0's
                out_dir = [args.out_dir]
                dist.broadcast_object_list(out_dir, src=0)
                args.out_dir = out_dir[0]
            log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
            if device.type == 'cuda':
                torch.backends.cudnn.benchmark = True
            os.makedirs(args.out_dir, exist_ok=True)
            table, images = load_table_once(args, rank, world, log)
            if args.val_frac:
                folds = dataset.person_folds(table['person'], table['age'], max(2, round(1 / args.val_frac)),
                                             args.seed)
            else:  # the final model: every row trains, nothing validates
                folds = np.ones(len(table), dtype=np.int64)
            val_rows = validation_rows(table, folds, 0)
            train_rows = training_rows(table, np.flatnonzero(folds != 0), args)
            if len(train_rows) < 2 or (args.val_frac and len(val_rows) < 1):
                raise dataset.DataError(f'too few rows to split ({len(table)} rows, '
                                        f'{table["person"].nunique()} people)')
            images = prepare_images(images, device, log)
            result = fit(args, images, table, train_rows, val_rows, args.out_dir, device, rank, world, resume, log)
    except (dataset.DataError, models.WeightsError, CheckpointError, Diverged) as e:
        error(e)
        return 1
    except torch.OutOfMemoryError:
        error(f'out of GPU memory at --batch-size {args.batch_size} --size {args.size}; '
              f'try --batch-size {max(1, args.batch_size // 2)}')
        return 1
    except KeyboardInterrupt:
        error('interrupted')
        return 130
    except OSError as e:  # the run directory cannot be written, a disk full, ...
        error(f'{e.filename or args.out_dir}: {e.strerror or e}')
        return 1
    if result['val_rmse'] is None:
        log(f'done: trained on all {result["n_train"]} rows for {result["epochs_run"]} epochs, no validation '
            f'({result["train_img_per_s"]:.0f} img/s, {fmt_time(result["seconds"])}); run saved in {args.out_dir}')
        return 0
    log(f'done: val RMSE {result["val_rmse"]:.3f}  MAE {result["val_mae"]:.3f}  R^2 {result["val_r2"]:.3f} '
        f'on {result["n_val"]} test-like rows; RMSE {result["val_rmse_clean"]:.3f} on the {result["n_val_clean"]} '
        f'clean ones (best epoch {result["best_epoch"]}, {result["train_img_per_s"]:.0f} img/s, '
        f'{fmt_time(result["seconds"])}); run saved in {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
