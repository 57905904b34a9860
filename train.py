"""Train one age regressor on a person-grouped train/validation split.

    python train.py --demo                                   # synthetic faces, CPU, ~2 minutes
    python clean_data.py --data data/wiki                    # once, for the real data
    python train.py --data data/wiki --model resnet50 --loss smoothl1 --out-dir runs/r50
    python train.py --data data/wiki --model cnn --weights none --epochs 20 --size 64 --device cpu
    python train.py --resume runs/r50                        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data data/wiki    # one run on 4 GPUs (DDP)

The run directory gets best.pt (everything predict.py needs), history.csv, metrics.json,
val_predictions.csv and predictions.png (predicted vs actual). Ctrl-C or SIGTERM saves last.pt,
from which --resume continues exactly where the run stopped.
"""
import argparse
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
import models

LOSSES = {'mse': nn.MSELoss, 'smoothl1': nn.SmoothL1Loss, 'l1': nn.L1Loss}
AGE_RANGE = (1.0, 100.0)  # predictions are clipped to the ages the clean data can hold
DEMO_DIR = os.path.join('data', 'demo')
# Sized for a laptop CPU: the demo must learn the drawn age cues in about two minutes.
DEMO_PRESET = dict(data=DEMO_DIR, model='cnn', weights='none', epochs=25, batch_size=32, lr=2e-3,
                   time_limit=2.5, patience=10)
DEMO_SIZE = {'cnn': 64, 'resnet50': 32}  # ResNet-50 trains ~60 images/s on 2 cores at 32 px


# ----------------------------------------------------------------------------- options

def add_train_options(parser):
    """Every option of one training run; cv.py takes the same ones under the same names."""
    parser.add_argument('--data', default='data/wiki', help='Kaggle folder (wiki_labels.csv, wiki_labeled/)')
    parser.add_argument('--csv', help='clean CSV from clean_data.py (default: DATA/wiki_labels_clean.csv)')
    parser.add_argument('--model', default='resnet50', choices=models.MODELS)
    parser.add_argument('--weights', help='imagenet (torch hub cache), none (from scratch) or a state-dict FILE '
                                          '(default: imagenet for resnet50, none for cnn)')
    parser.add_argument('--loss', default='smoothl1', choices=sorted(LOSSES))
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--batch-size', type=int, default=128, help='images per step, over all GPUs')
    parser.add_argument('--lr', type=float, default=1e-3, help='peak AdamW learning rate (warm-up, cosine decay)')
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--size', type=int, default=100, help='model input size in pixels (images are 100x100)')
    parser.add_argument('--no-augment', action='store_true', help='no crop/flip/rotation/colour augmentation')
    parser.add_argument('--balance-gender', action='store_true',
                        help='oversample the rarer gender in the TRAINING part (never in validation)')
    parser.add_argument('--train-min-face-score', type=float,
                        help='also drop training rows below this face score (validation keeps them)')
    parser.add_argument('--train-max-age', type=float, help='also drop training rows older than this')
    parser.add_argument('--train-min-age', type=float, help='also drop training rows younger than this')
    parser.add_argument('--patience', type=int, default=6, help='stop after this many epochs without a better val RMSE')
    parser.add_argument('--limit', type=int, help='use only N randomly chosen rows (smoke tests)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda', 'mps'))
    parser.add_argument('--time-limit', type=float, help='minutes; stop cleanly after the step that crosses it')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA; slower start)')
    parser.add_argument('--log-every', type=int, default=50, help='steps between progress lines')
    parser.add_argument('--demo', action='store_true',
                        help=f'make synthetic data in {DEMO_DIR} if absent and use CPU-sized presets')


def check_args(parser, args):
    """Impossible values are argparse errors (exit code 2), before anything is loaded."""
    positive = ['epochs', 'batch_size', 'lr', 'size', 'patience', 'log_every']
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if args.weight_decay < 0:
        parser.error(f'--weight-decay must be >= 0, got {args.weight_decay}')
    if args.size < models.MIN_SIZE[args.model]:
        parser.error(f'--size {args.size} is too small for {args.model} (at least {models.MIN_SIZE[args.model]})')
    if args.limit is not None and args.limit < 4:
        parser.error(f'--limit must be at least 4, got {args.limit}')
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f'--time-limit must be positive minutes, got {args.time_limit}')
    if getattr(args, 'val_frac', 0.2) is not None and not 0 < getattr(args, 'val_frac', 0.2) <= 0.5:
        parser.error(f'--val-frac must be in (0, 0.5], got {args.val_frac}')


def parse_args(parser, argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--demo' in argv:
        parser.set_defaults(**DEMO_PRESET)  # flags given explicitly still win
    args = parser.parse_args(argv)
    if args.demo and not given(argv, '--size'):
        args.size = DEMO_SIZE[args.model]
    if args.weights is None:
        args.weights = 'imagenet' if args.model == 'resnet50' else 'none'
    check_args(parser, args)
    return args


def given(argv, flag):
    """Was flag on the command line, as '--flag VALUE' or '--flag=VALUE'?"""
    return any(a == flag or a.startswith(flag + '=') for a in argv)


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


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. Returns (rank, world_size, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, pick_device(args.device)
    use_cuda = torch.cuda.is_available() and args.device != 'cpu'
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    if use_cuda:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    return dist.get_rank(), dist.get_world_size(), device


def load_table(args, log=print):
    """The clean table and its decoded images (cached); rows whose image cannot be read are dropped
    with a count. --demo makes and cleans the synthetic data first."""
    if args.demo and not os.path.exists(os.path.join(args.data, 'wiki_labels.csv')):
        log(f'making synthetic demo data in {args.data}')
        dataset.make_demo_data(args.data)
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


def training_rows(table, rows, args):
    """The training part, optionally filtered harder than the clean CSV (validation never is)."""
    rules = clean_data.metadata_rules(
        table.iloc[rows], min_face_score=args.train_min_face_score, keep_second_face=True,
        min_age=-math.inf if args.train_min_age is None else args.train_min_age,
        max_age=math.inf if args.train_max_age is None else args.train_max_age)
    bad = np.zeros(len(rows), dtype=bool)
    for mask in rules.values():
        bad |= mask
    return rows[~bad]


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


# ----------------------------------------------------------------------------- prediction

def autocast(device):
    """bf16 where the GPU has it: same range as fp32, so no loss scaling; fp16 (scaled) otherwise."""
    if device.type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast('cuda', dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.inference_mode()
def predict(model, images, rows, size, channels, batch_size, device, tta=False):
    """Ages in years for images[rows]: the evaluation path of train.py, cv.py and predict.py.
    tta=True averages each image with its mirror image."""
    model.eval()
    out = []
    rows = torch.as_tensor(rows)
    for start in range(0, len(rows), batch_size):
        x_u8 = images.index_select(0, rows[start:start + batch_size].to(images.device)).to(device, non_blocking=True)
        views = (False, True) if tta else (False,)
        total = 0
        for flip in views:
            x = dataset.to_model_input(x_u8, size, channels, flip=flip)
            if device.type == 'cuda':
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                total = total + model.ages(model(x))
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


# ----------------------------------------------------------------------------- training

class Stop:
    """Ctrl-C / SIGTERM set a flag; the loop saves a resumable checkpoint at the end of the step."""
    signal = None

    @classmethod
    def install(cls):
        cls.signal = None
        def handler(signum, frame):
            if cls.signal is not None:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            cls.signal = signum
            print(f'\n{signal.Signals(signum).name}: stopping after this step, saving last.pt ...', flush=True)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)


class Diverged(Exception):
    """The loss or the validation error stopped being a finite number."""


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def save(path, obj):
    dataset.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """weights_only=True: tensors, numbers, strings, lists and dicts only. A file that carries a
    pickled object (one that could run code when loaded) is refused and nothing in it runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise dataset.DataError(f'{path}: checkpoint not found') from None
    except Exception as e:
        raise dataset.DataError(f'{path}: refused: not a plain checkpoint of tensors and numbers '
                                f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None


def fit(args, images, table, train_rows, val_rows, out_dir, device, rank=0, world=1, resume=None, log=print):
    """Train on images[train_rows], validate on images[val_rows] every epoch, keep the best.

    images: uint8 tensor (N, 100, 100), on `device` when it fits (no copy per batch) or on the CPU.
    Returns a dict of final metrics. Raises Diverged on a NaN/inf loss, SystemExit after a signal."""
    main_rank = rank == 0
    ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
    train_rows = torch.as_tensor(train_rows)
    y_train = ages[train_rows.to(ages.device)]
    y_mean, y_std = float(y_train.mean()), float(y_train.std()) if len(train_rows) > 1 else 1.0
    channels = models.INPUT_CHANNELS[args.model]
    torch.manual_seed(args.seed)
    model = models.build_model(args.model, args.weights, y_mean, max(y_std, 1e-3)).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == 'cuda')
    per_rank = max(1, args.batch_size // world)
    n_order = len(train_rows)
    steps_per_epoch = max(1, n_order // world // per_rank)
    total_steps = args.epochs * steps_per_epoch
    warmup = min(total_steps // 10, 3 * steps_per_epoch)

    def lr_factor(step):  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    use_fp16 = device.type == 'cuda' and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler('cuda', enabled=use_fp16)
    criterion = LOSSES[args.loss]()
    weights = sample_weights(table['gender'].to_numpy()[train_rows.numpy()]) if args.balance_gender else None
    aug = None if args.no_augment else torch.Generator(device=device)

    state = {'epoch': 0, 'step': 0, 'best_val_rmse': math.inf, 'best_epoch': -1, 'bad_epochs': 0,
             'history': [], 'loss_sum': 0.0, 'loss_count': 0, 'train_images': 0, 'train_seconds': 0.0}
    if resume is not None:
        raw_model.load_state_dict(resume['model'])
        optimizer.load_state_dict(resume['optimizer'])
        scheduler.load_state_dict(resume['scheduler'])
        scaler.load_state_dict(resume['scaler'])
        state.update(resume['state'])
        if aug is not None and resume.get('aug_rng') is not None:
            aug.set_state(resume['aug_rng'])
        torch.set_rng_state(resume['torch_rng'])  # dropout draws from the global generator
        if device.type == 'cuda' and resume.get('cuda_rng') is not None:
            torch.cuda.set_rng_state(resume['cuda_rng'], device)
        log(f'resumed at epoch {state["epoch"] + 1} step {state["step"]} (best val RMSE {state["best_val_rmse"]:.3f})')

    def checkpoint(kind):
        return {'model': raw_model.state_dict(), 'model_name': args.model, 'size': args.size, 'channels': channels,
                'args': vars(args), 'y_mean': y_mean, 'y_std': y_std,
                **({'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                    'scaler': scaler.state_dict(), 'state': dict(state),
                    'aug_rng': aug.get_state() if aug is not None else None, 'torch_rng': torch.get_rng_state(),
                    'cuda_rng': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}
                   if kind == 'last' else
                   {'epoch': state['best_epoch'], 'val_rmse': state['best_val_rmse']})}

    def evaluate():
        pred = predict(raw_model, images, val_rows, args.size, channels, 2 * per_rank, device)
        return metrics_from_sums(metric_sums(pred, torch.as_tensor(table['age'].to_numpy()[val_rows]))), pred

    def agree(flag):  # every rank must stop at the same step
        if world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    start = time.time()
    epochs_before = len(state['history'])  # a resumed run times only its own epochs
    deadline = start + args.time_limit * 60 if args.time_limit else None
    stopped = 'completed'
    log(f'training {args.model} on {len(train_rows)} images, validating on {len(val_rows)} '
        f'({steps_per_epoch} steps/epoch x {args.epochs} epochs, batch {per_rank * world}, device {device}'
        f'{f", {world} processes" if world > 1 else ""})')
    while state['epoch'] < args.epochs and stopped == 'completed':
        epoch = state['epoch']
        order = epoch_order(n_order, weights, args.seed, epoch)
        order = train_rows[order[rank::world]].to(images.device)  # indices live with the images
        if state['step'] == 0:
            if aug is not None:
                aug.manual_seed(args.seed * 1_000_003 + epoch * 101 + rank)
            state.update(loss_sum=0.0, loss_count=0)
        model.train()
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        tick, tick_images, seen = time.time(), 0, 0
        for step in range(state['step'], steps_per_epoch):
            idx = order[step * per_rank:(step + 1) * per_rank]
            x = dataset.to_model_input(images.index_select(0, idx).to(device, non_blocking=True),
                                       args.size, channels, generator=aug)
            if device.type == 'cuda':
                x = x.contiguous(memory_format=torch.channels_last)
            y = (ages[idx.to(ages.device)].to(device, non_blocking=True) - y_mean) / y_std
            with autocast(device):
                out = model(x)
            loss = criterion(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += torch.nan_to_num(loss)
            seen += 1
            tick_images += len(idx) * world
            state['step'] = step + 1
            last = step + 1 == steps_per_epoch
            logging_step = (step + 1) % args.log_every == 0 or last
            if logging_step or (device.type == 'cpu' and world == 1):  # a sync only at log steps on GPUs
                if world > 1:
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)  # every rank stops at the same step
                bad = int(first_bad)
                if bad >= 0:
                    raise Diverged(f'the loss became NaN/inf at epoch {epoch + 1} step {bad + 1}; stopping. '
                                   f'The last good checkpoint is kept in {out_dir} (try a lower --lr).')
            if logging_step:
                state['loss_sum'] += float(loss_sum)
                state['loss_count'] += seen
                loss_sum.zero_()
                seen = 0
                now = time.time()
                state['train_seconds'] += now - tick
                state['train_images'] += tick_images
                speed = tick_images / max(now - tick, 1e-9)
                left = (total_steps - epoch * steps_per_epoch - step - 1) * per_rank * world / max(speed, 1e-9)
                if deadline:
                    left = min(left, deadline - now)
                if main_rank:
                    log(f'epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} '
                        f'loss {state["loss_sum"] / max(state["loss_count"], 1):.4f} '
                        f'lr {scheduler.get_last_lr()[0]:.2e} {speed:.0f} img/s '
                        f'elapsed {fmt_time(now - start)} left ~{fmt_time(left)}')
                tick, tick_images = now, 0
            check_now = world == 1 or logging_step
            if check_now and agree(Stop.signal is not None):
                state['loss_sum'] += float(loss_sum)
                state['loss_count'] += seen
                if main_rank:
                    save(os.path.join(out_dir, 'last.pt'), checkpoint('last'))
                    log(f'saved {os.path.join(out_dir, "last.pt")} at epoch {epoch + 1} step {step + 1}; '
                        f'continue with: python train.py --resume {out_dir}')
                raise SystemExit(128 + Stop.signal if Stop.signal else 130)
            if check_now and deadline and agree(time.time() > deadline):
                stopped = 'time_limit'
                break
        # End of an epoch (or of the time limit): validate, keep the best, maybe stop early.
        if state['loss_count'] == 0 and seen:
            state['loss_sum'] += float(loss_sum)
            state['loss_count'] += seen
        metrics, _ = evaluate()
        if not math.isfinite(metrics['rmse']):
            raise Diverged(f'the validation RMSE is not finite after epoch {epoch + 1}; stopping (try a lower --lr)')
        improved = metrics['rmse'] < state['best_val_rmse']
        state['epoch'] += 1 if stopped == 'completed' else 0
        state['step'] = 0
        row = {'epoch': epoch + 1, 'train_loss': state['loss_sum'] / max(state['loss_count'], 1),
               'val_rmse': metrics['rmse'], 'val_mae': metrics['mae'], 'val_r2': metrics['r2'],
               'lr': scheduler.get_last_lr()[0],
               'img_per_s': state['train_images'] / max(state['train_seconds'], 1e-9),
               'seconds': time.time() - start}
        state['history'].append(row)
        if improved:
            state.update(best_val_rmse=metrics['rmse'], best_epoch=epoch + 1, bad_epochs=0)
            if main_rank:
                save(os.path.join(out_dir, 'best.pt'), checkpoint('best'))
        else:
            state['bad_epochs'] += 1
        if main_rank:
            left = (args.epochs - epoch - 1) * row['seconds'] / max(len(state['history']) - epochs_before, 1)
            if deadline:
                left = min(left, deadline - time.time())
            log(f'epoch {epoch + 1}/{args.epochs} train_loss {row["train_loss"]:.4f} val_rmse {metrics["rmse"]:.3f} '
                f'val_mae {metrics["mae"]:.3f} val_r2 {metrics["r2"]:.3f} {row["img_per_s"]:.0f} img/s '
                f'elapsed {fmt_time(row["seconds"])} left ~{fmt_time(left)}{"  *best" if improved else ""}')
            dataset.write_csv(pd.DataFrame(state['history']), os.path.join(out_dir, 'history.csv'))
            if stopped == 'completed' and state['epoch'] < args.epochs:
                save(os.path.join(out_dir, 'last.pt'), checkpoint('last'))
        if stopped == 'completed' and agree(state['bad_epochs'] >= args.patience):
            stopped = 'early_stop'
            if main_rank:
                log(f'early stop: no better val RMSE for {args.patience} epochs')
        if stopped == 'time_limit' and main_rank:
            log(f'time limit of {args.time_limit:g} min reached')

    # Final numbers come from the best checkpoint, evaluated once more.
    best = load_checkpoint(os.path.join(out_dir, 'best.pt')) if main_rank else None
    if world > 1:
        dist.barrier()
        best = load_checkpoint(os.path.join(out_dir, 'best.pt'))
    raw_model.load_state_dict(best['model'])
    metrics, pred = evaluate()
    result = {'val_rmse': metrics['rmse'], 'val_mae': metrics['mae'], 'val_r2': metrics['r2'],
              'best_epoch': state['best_epoch'], 'epochs_run': len(state['history']), 'stopped': stopped,
              'train_img_per_s': state['train_images'] / max(state['train_seconds'], 1e-9),
              'seconds': time.time() - start, 'n_train': len(train_rows), 'n_val': len(val_rows),
              'device': str(device), 'world_size': world, 'model': args.model, 'size': args.size}
    if main_rank:
        val = pd.DataFrame({'ID': table['ID'].to_numpy()[val_rows], 'age': table['age'].to_numpy()[val_rows],
                            'prediction': pred.numpy()})
        dataset.write_csv(val, os.path.join(out_dir, 'val_predictions.csv'))
        plot_predictions(os.path.join(out_dir, 'predictions.png'), val['age'], val['prediction'],
                         f'{args.model}, validation, best epoch {state["best_epoch"]}')
        dataset.write_json(result, os.path.join(out_dir, 'metrics.json'))
        if os.path.exists(os.path.join(out_dir, 'last.pt')):
            os.remove(os.path.join(out_dir, 'last.pt'))  # finished: best.pt is what counts
    result['val_pred'] = pred
    return result


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_options(parser)
    parser.add_argument('--val-frac', type=float, default=0.2,
                        help='validation share, grouped by person (1/round(1/val_frac) of the people)')
    parser.add_argument('--out-dir', help='run directory (default: runs/MODEL-LOSS-DATE-TIME, or runs/demo-DATE-TIME)')
    parser.add_argument('--resume', metavar='RUN_DIR',
                        help='continue the run saved in RUN_DIR/last.pt with its saved options '
                             '(only --device, --time-limit and --log-every may change)')
    args = parse_args(parser, argv)
    if args.resume:
        last = os.path.join(args.resume, 'last.pt')
        if not os.path.exists(last):
            done = os.path.exists(os.path.join(args.resume, 'metrics.json'))
            parser.error(f'--resume {args.resume}: ' + ('the run finished (metrics.json is there)' if done
                                                        else 'no last.pt to resume from'))
        resume = load_checkpoint(last)
        saved = dict(resume['args'])
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
    rank, world, device = setup_distributed(args)
    if world > 1:  # the ranks may have stamped their default --out-dir a second apart: use rank 0's
        out_dir = [args.out_dir]
        dist.broadcast_object_list(out_dir, src=0)
        args.out_dir = out_dir[0]
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    Stop.install()
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        table, images = load_table_once(args, rank, world, log)
        folds = dataset.person_folds(table['person'], table['age'], max(2, round(1 / args.val_frac)), args.seed)
        val_rows = np.flatnonzero(folds == 0)
        train = training_rows(table, np.flatnonzero(folds != 0), args)
        if len(train) < 2 or len(val_rows) < 1:
            raise dataset.DataError(f'too few rows to split ({len(table)} rows, {table["person"].nunique()} people)')
        images = prepare_images(images, device, log)
        result = fit(args, images, table, train, val_rows, args.out_dir, device, rank, world, resume, log)
    except (dataset.DataError, models.WeightsError, Diverged) as e:
        log(f'error: {e}')
        return 1
    except torch.OutOfMemoryError:
        log(f'error: out of GPU memory at --batch-size {args.batch_size} --size {args.size}; '
            f'try --batch-size {max(1, args.batch_size // 2)}')
        return 1
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    log(f'done: val RMSE {result["val_rmse"]:.3f}  MAE {result["val_mae"]:.3f}  R^2 {result["val_r2"]:.3f} '
        f'(best epoch {result["best_epoch"]}, {result["train_img_per_s"]:.0f} img/s, '
        f'{fmt_time(result["seconds"])}); run saved in {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
