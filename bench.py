"""How fast each part of training runs on this machine, in images per second, on the same images.

    python bench.py --model cnn --device cpu                        # a minute or two on a CPU
    python bench.py --model resnet50 --device cpu --batch-size 32   # a minute or two on a CPU
    python bench.py --model resnet50 --json runs/bench-r50.json     # GPU: also MFU, peak memory
    python bench.py --data data/wiki --model resnet50               # the first --n real faces
    python bench.py --model cnn --size 32 --batch-size 8 --device cpu --quick   # smoke test
    python bench.py --model cnn --size 48 --batch-size 32 --device cpu --side-by-side

The rows of the table it prints:
  pipeline (ours)   the uint8 images on the device; a batch gathered at random indices, then
                    dataset.to_model_input: crop, flip, rotation, brightness/contrast per image,
                    one grid_sample for the whole batch. The ratio column is ours / naive.
  pipeline (naive)  the usual per-image way: a Dataset that opens each PNG with PIL and applies
                    torchvision transforms, a DataLoader with --workers processes, batches to
                    the device.
  train step        forward, loss, backward and AdamW step on ONE fixed batch: the model's
                    speed limit, eager; with --compile also compiled (ratio: compiled / eager),
                    with its first step's time, which holds the compiling.
  train loop        train.fit itself (augmentation on; validation is not timed; compiled with
                    --compile). Ratio: loop / eager step, near 1 when the loop adds nothing.
  predict           models.predict_ages, the evaluation path of train.py, cv.py and predict.py
                    (no flip).
On CUDA it also prints the model FLOP utilisation (MFU) of the train step and the peak memory of
the loop. --side-by-side times only the train step and the loop, twice: in one process with a
thread per core, and in one one-thread process per core at once (as `cv.py --jobs N` runs its
runs); it prints the images per second of each and of all together.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import clean_data
import cli
import dataset
import demo_data
import models
import train


# ----------------------------------------------------------------------------- timing

def clock(device):
    """Seconds, after the device has finished what was queued: GPU work runs asynchronously, so a
    clock read without a sync measures how fast Python queues kernels, not how fast they run."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()
    return time.perf_counter()


def measure(fn, device, seconds, warmup, calls=None, min_calls=3):
    """Call fn() `warmup` times untimed (the first calls pay for kernel selection, memory
    allocation, worker start-up), then `calls` times, or as many as fill `seconds` by the pace of
    the second half of the warm-up. Returns (calls, elapsed seconds)."""
    half = warmup // 2
    for _ in range(warmup - half):
        fn()
    t = clock(device)
    for _ in range(half):
        fn()
    per_call = (clock(device) - t) / half
    if calls is None:
        calls = max(min_calls, math.ceil(seconds / max(per_call, 1e-9)))
    t = clock(device)
    for _ in range(calls):
        fn()
    return calls, clock(device) - t


# ----------------------------------------------------------------------------- images

def load_faces(args, tmp, log):
    """(paths, table, images): the PNG files the naive pipeline reads, their IDs and ages, and the
    same faces decoded once into one uint8 array for ours. Rows whose image does not decode or
    whose age is missing are dropped."""
    if args.data:
        root = args.data
    else:
        root = os.path.join(tmp, 'demo')
        log(f'making {args.n} synthetic faces in {root}')
        demo_data.make_demo_data(root, n=args.n, n_judge=10, seed=args.seed)
    files = dataset.find_files(root)
    dataset.require(files, root, 'labels', 'images')
    table = dataset.read_labels(files['labels']).head(args.n)
    paths = [os.path.join(files['images'], p) for p in table['path']]
    images, problems = dataset.decode_all(paths)
    ages = table['age'].to_numpy(dtype=np.float64)
    ok = np.array([dataset.usable(p) for p in problems]) & np.isfinite(ages)
    if ok.sum() < 2:
        raise dataset.DataError(f'{root}: fewer than 2 readable images with an age in the first '
                                f'{args.n} rows')
    log(f'{ok.sum()} of {len(table)} images decoded ({len(table) - ok.sum()} dropped: unreadable '
        'or no age)')
    # Speed does not depend on the labels, but the 790-year ages of the raw CSV would make fit's
    # standardised targets (and so its loss) odd; clip them as the clean data would.
    ages = np.clip(ages[ok], *dataset.AGE_RANGE).astype(np.float32)
    table = table[ok].reset_index(drop=True).assign(age=ages)
    return [p for p, keep in zip(paths, ok) if keep], table, images[ok]


def augmentation(model):
    """The recipe's augmentation strengths for `model`, as training uses them."""
    return {key: train.RECIPE[key][model] for key in train.AUGMENTATION}


class PILFaces(torch.utils.data.Dataset):
    """The per-image pipeline most tutorials write, for comparison: open the PNG with PIL, then
    torchvision transforms with the recipe's augmentation strengths (train.RECIPE)."""

    def __init__(self, paths, ages, size, channels, strengths):
        self.paths, self.ages, self.mode = paths, ages, 'RGB' if channels == 3 else 'L'
        mean, std = (dataset.IMAGENET_MEAN, dataset.IMAGENET_STD) if channels == 3 else \
            ([dataset.GREY_MEAN], [dataset.GREY_STD])
        a = strengths
        self.transform = T.Compose([T.RandomResizedCrop(size, scale=a['crop_area'],
                                                        ratio=a['crop_aspect']),
                                    T.RandomHorizontalFlip(a['flip']),
                                    T.RandomRotation(a['rotation']),
                                    T.ColorJitter(brightness=a['brightness'],
                                                  contrast=a['contrast']),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            x = self.transform(im.convert(self.mode))
        return x, torch.tensor(self.ages[i])


# ----------------------------------------------------------------------------- the measurements

def bench_ours(args, images, ages, channels, device):
    """fit's input lines, on batches gathered at random indices (drawn where fit keeps its epoch
    order: with the images)."""
    aug = torch.Generator(device=device).manual_seed(args.seed)
    pick = torch.Generator(device=images.device).manual_seed(args.seed)

    def step():
        idx = torch.randint(len(images), (args.batch_size,), generator=pick, device=images.device)
        x = dataset.to_model_input(images.index_select(0, idx).to(device, non_blocking=True),
                                   args.size, channels,
                                   aug, augmentation(args.model))
        y = ages[idx.to(ages.device)].to(device, non_blocking=True)
        return x, y

    return measure(step, device, args.seconds, args.warmup, min_calls=5)


def bench_naive(args, paths, ages, channels, device):
    faces = PILFaces(paths, ages, args.size, channels, augmentation(args.model))
    # Sampling with replacement from a huge count: one iterator that never ends, so the workers
    # start once and the timing sees them in their steady state.
    sampler = torch.utils.data.RandomSampler(faces, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(faces, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers,
                                         pin_memory=device.type == 'cuda')
    batches = iter(loader)

    def step():
        x, y = next(batches)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    # Each worker prepares 2 batches ahead (prefetch_factor); the warm-up drains that head start
    # so the timed batches are made at the workers' real pace.
    warmup = max(args.warmup, 4 * args.workers + 2)
    calls, seconds = measure(step, device, args.seconds, warmup, min_calls=5)
    del batches  # stops the worker processes before the training measurements start
    return calls, seconds


def bench_step(args, train_args, images, ages, channels, device):
    """The model alone: train.train_step (forward, loss, backward, AdamW step) on one batch made
    once, with the model and optimizer that train.fit builds (compiled when train_args say so).
    Returns (model, calls, seconds, FLOPs of a step, seconds of the first step: compiling, if
    any)."""
    y_mean, y_std = float(ages.mean()), float(ages.std())
    learner = models.build_learner(train_args, train.recipe_of(args.model), y_mean, y_std, device)
    idx = torch.randint(len(images), (args.batch_size,),
                        generator=torch.Generator().manual_seed(args.seed))
    x = dataset.to_model_input(images[idx.to(images.device)].to(device), args.size, channels,
                               torch.Generator(device=device).manual_seed(args.seed),
                               augmentation(args.model))
    y = (ages[idx.to(ages.device)].to(device) - y_mean) / y_std
    learner.step_model.train()

    def step():
        train.train_step(learner, x, y)

    t = clock(device)
    step()
    first = clock(device) - t
    # FLOPs of one step as MFU counts them: the matrix products and convolutions of forward and
    # backward (the optimizer's elementwise work is not counted: a rounding error next to them).
    # Counted on the plain model: a compiled one runs the same products, out of the counter's sight.
    with FlopCounterMode(display=False) as counter:
        train.train_step(dataclasses.replace(learner, step_model=learner.model), x, y)
    calls, seconds = measure(step, device, args.seconds, args.warmup, calls=args.steps,
                             min_calls=args.min_steps)
    return learner.model, calls, seconds, counter.get_total_flops(), first


def bench_loop(args, train_args, images, table, device, steps, tmp, log):
    """train.fit itself, after a warm-up fit of --warmup steps (the same untimed warm-up the train
    step had): fit's img/s counts every step from its first, so on a cold process its first steps
    (oneDNN/cuDNN kernel choice, allocator growth) would be charged to the loop. The process-wide
    caches those fill carry over to the timed fit; what is left (a fresh model and AdamW state) is
    one step's worth, small next to the `steps` (at least --min-loop-steps) timed ones."""
    def run(n_steps, name):
        # Rows repeat as needed, so one epoch is exactly n_steps batches (fit's steps per epoch is
        # rows // batch) and validation, which fit does not time, runs once on one small batch.
        rows = np.resize(np.arange(len(table)), n_steps * args.batch_size)
        val_rows = np.arange(min(len(table), args.batch_size))
        split = clean_data.make_rows(train_args, images, table, rows, val_rows)
        return train.fit(train_args, split, os.path.join(tmp, name), device, log=log)

    run(args.warmup, 'fit-warmup')
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    result = run(steps, 'fit')
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == 'cuda' else None
    return result['train_img_per_s'], peak_gb


def bench_predict(args, model, images, channels, device, precision):
    """models.predict_ages over enough rows (repeated) to fill --seconds, at the batch fit
    validates with."""
    batch = models.eval_batch(args.batch_size, device)

    def run(n):
        rows = np.resize(np.arange(len(images)), n)
        t = clock(device)
        models.predict_ages(model, images, rows, args.size, channels, batch, device, tta=False,
                            precision=precision)
        return clock(device) - t

    run(batch)  # warm-up: eval-mode kernels are chosen on the first call
    per_image = run(2 * batch) / (2 * batch)
    n = max(2, math.ceil(args.seconds / per_image / batch)) * batch
    return n, run(n)


# ----------------------------------------------------------------------------- report

def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'mps':
        return 'Apple GPU (mps)'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None


def print_table(rows):
    print(f'{"measurement":<20} {"images/s":>10} {"ratio":>7}  notes')
    for name, speed, ratio, note in rows:
        print(f'{name:<20} {speed:>10,.0f} {ratio:>7}  {note}')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    number = cli.number
    parser.add_argument('--model', default='resnet50', choices=models.MODELS, help='network')
    parser.add_argument('--size', type=number(int, at_least=1, at_most=models.MAX_SIZE),
                        help='model input size in pixels (default: train.RECIPE\'s, '
                             f'{cli.per_model(train.RECIPE, "size")})')
    parser.add_argument('--batch-size', type=number(int, at_least=1),
                        help='images per step (default: train.RECIPE\'s, '
                             f'{cli.per_model(train.RECIPE, "batch_gpu")} on a GPU, '
                             f'{cli.per_model(train.RECIPE, "batch_cpu")} on the CPU)')
    cli.add_device(parser)
    cli.add_precision(parser)
    parser.add_argument('--data', help='a Kaggle folder (wiki_labels.csv, wiki_labeled/); default: '
                                       'synthetic faces')
    parser.add_argument('--n', type=number(int, at_least=2), default=2000,
                        help='images to use (the first N rows of --data)')
    parser.add_argument('--workers', type=number(int, at_least=0),
                        default=min(4, os.cpu_count() or 1),
                        help='DataLoader processes of the naive pipeline')
    parser.add_argument('--seconds', type=number(above=0),
                        help='target time of each measurement (default 5 on CPU, 10 on a GPU)')
    parser.add_argument('--warmup', type=number(int, at_least=2), default=2,
                        help='untimed calls before each measurement (the second half of them sets '
                             'the pace)')
    parser.add_argument('--steps', type=number(int, at_least=1),
                        help='timed train steps, bare and in the loop (default: fill --seconds)')
    parser.add_argument('--min-steps', type=number(int, at_least=1), default=5,
                        help='timed bare train steps at least')
    parser.add_argument('--min-loop-steps', type=number(int, at_least=1), default=10,
                        help='steps of the timed train.fit at least')
    # NVIDIA's H100/H200 SXM datasheet: 989 TFLOP/s dense bf16 tensor-core (1979 with sparsity).
    # Give your GPU's dense bf16 (or fp16, if it has no bf16) figure for another GPU.
    parser.add_argument('--peak-tflops', type=number(above=0), default=989.0,
                        help='the GPU\'s dense bf16 peak, for MFU')
    cli.add_compile(parser, help='torch.compile the train step and loop\'s model, as train.py '
                                 '--compile [MODE]')
    parser.add_argument('--ema', type=number(at_least=0, below=1), default=0.0,
                        help='the loop keeps a moving average, as train.py --ema')
    parser.add_argument('--seed', type=number(int, at_least=0), default=0,
                        help='seed of the faces, batches and weights')
    parser.add_argument('--json', metavar='FILE', help='also write the figures here')
    parser.add_argument('--side-by-side', action='store_true',
                        help='time the train step and loop in one process with a thread per core, '
                             'then in one one-thread process per core at once')
    parser.add_argument('--training-only', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--start-with', help=argparse.SUPPRESS)  # a file --side-by-side makes
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 64 images, short measurements')
    return parser


def training_options(args, precision):
    """fit's own options, parsed by train.py's parser with its per-model defaults (the loss among
    them), so they stay in step with it. Weights 'none': speed does not depend on them, and the
    ImageNet file may not be on this machine."""
    return cli.parse_args(train.build_parser(), [
        '--model', args.model, '--weights', 'none', '--size', str(args.size), '--batch-size',
        str(args.batch_size), '--precision', precision,
        '--device', args.device, '--epochs', '1', '--patience', '1000000', '--log-every', '1000000',
        '--seed', str(args.seed), '--ema',
        str(args.ema)] + (['--compile', args.compile] if args.compile else []))


def precisions_to_time(args, device):
    """[(precision, why)]: the one --precision gives; on a CPU whose auto choice is bf16, fp32 first
    too, so that the table shows what bf16 gains there."""
    chosen = models.choose_precision(args.precision, device)
    if args.precision == 'auto' and device.type == 'cpu' and chosen[0] == 'bf16':
        return [('fp32', 'for comparison'), chosen]
    return [chosen]


def measure_all(args, device, log):
    """Every row of the table: {name: (calls or images, seconds)} for the input pipelines, and for
    each precision timed {precision: its figures} (measure_precision)."""
    channels = models.INPUT_CHANNELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        paths, table, images_np = load_faces(args, tmp, log)
        images = dataset.place_images(images_np, device, log)
        ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
        timed = {}
        log('measuring the input pipeline (ours) ...')
        timed['ours'] = bench_ours(args, images, ages, channels, device)
        log(f'measuring the input pipeline (naive, {args.workers} workers) ...')
        timed['naive'] = bench_naive(args, paths, table['age'].to_numpy(dtype=np.float32), channels,
                                     device)
        by_precision = {}
        for precision, why in precisions_to_time(args, device):
            log(f'in {precision} ({why}):')
            by_precision[precision] = measure_precision(args, precision, images, table, ages,
                                                        device, tmp, log)
    return timed, by_precision, len(images)


def measure_precision(args, precision, images, table, ages, device, tmp, log):
    """The bare train step (and compiled, with --compile), prediction and the train loop, in one
    precision: {'step': (calls, seconds), 'compiled': (calls, seconds, first step's seconds),
    'predict': (images, seconds), 'flops', 'loop_steps', 'loop_img_per_s', 'peak_gb'}."""
    channels = models.INPUT_CHANNELS[args.model]
    train_args = training_options(args, precision)
    fit_log = lambda *a: print('  train.fit:', *a, flush=True)  # noqa: E731
    out = {}
    log('measuring the bare train step ...')
    eager_args = argparse.Namespace(**{**vars(train_args), 'compile': None})
    model, calls, seconds, out['flops'], _ = bench_step(args, eager_args, images, ages, channels,
                                                        device)
    out['step'] = calls, seconds
    if args.compile:
        log(f'measuring the bare train step, compiled ({args.compile}) ...')
        *_, c_calls, c_seconds, _, first = bench_step(args, train_args, images, ages, channels,
                                                      device)
        out['compiled'] = c_calls, c_seconds, first
    log('measuring prediction ...')
    out['predict'] = bench_predict(args, model, images, channels, device, precision)
    del model  # free its memory before the loop's peak is measured
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    out['loop_steps'] = args.steps or max(args.min_loop_steps, calls)
    log(f'measuring the train loop (train.fit, {out["loop_steps"]} steps) ...')
    out['loop_img_per_s'], out['peak_gb'] = bench_loop(args, train_args, images, table, device,
                                                       out['loop_steps'], tmp, fit_log)
    return out


def measure_training(args, train_args, device, log):
    """--training-only, what each process of --side-by-side runs: the bare train step and the
    train loop, the faces read from --data (made once by the parent)."""
    channels = models.INPUT_CHANNELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        _, table, images_np = load_faces(args, tmp, log)
        images = dataset.place_images(images_np, device, log)
        ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
        if args.start_with:  # side by side: measure only once every process has its faces
            open(f'{args.start_with}.ready{os.getpid()}', 'w').close()
            while not os.path.exists(args.start_with):
                time.sleep(0.05)
        _, calls, seconds, _, _ = bench_step(args, train_args, images, ages, channels, device)
        loop_steps = args.steps or max(args.min_loop_steps, calls)
        loop, _ = bench_loop(args, train_args, images, table, device, loop_steps, tmp, log)
    return {'step_img_per_s': calls * args.batch_size / seconds, 'loop_img_per_s': loop,
            'threads': torch.get_num_threads()}


def side_by_side(args, argv, log):
    """The train step and loop in one process with a thread per core, then in one one-thread
    process per core at once: {'one': figures, 'each': [figures per process]}."""
    cores = models.cpu_cores()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:  # the same faces for every process, drawn once
            log(f'making {args.n} synthetic faces in {tmp}')
            demo_data.make_demo_data(os.path.join(tmp, 'demo'), n=args.n, n_judge=10,
                                     seed=args.seed)
        data = args.data or os.path.join(tmp, 'demo')

        def launch(copies, threads):
            env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
            outs = [os.path.join(tmp, f'{copies}-{i}.json') for i in range(copies)]
            start = os.path.join(tmp, f'start{copies}')
            command = [sys.executable, os.path.abspath(__file__), *argv, '--data', data,
                       '--training-only', '--start-with', start]
            procs = [subprocess.Popen([*command, '--json', out], env=env, stdout=subprocess.DEVNULL)
                     for out in outs]
            def ready():
                return sum(f.startswith(f'start{copies}.ready') for f in os.listdir(tmp))
            while ready() < copies and all(p.poll() is None for p in procs):
                time.sleep(0.05)
            open(start, 'w').close()  # every process has its faces: all measure together
            if any(p.wait() != 0 for p in procs):
                raise dataset.DataError('a --training-only process failed (its error is above)')
            figures = []
            for out in outs:
                with open(out) as f:
                    figures.append(json.load(f))
            return figures
        log(f'one process, {cores} threads ...')
        one = launch(1, cores)[0]
        log(f'{cores} one-thread processes at once ...')
        each = launch(cores, 1)
    rows = []
    for what, key in (('step', 'step_img_per_s'), ('loop', 'loop_img_per_s')):
        together = sum(f[key] for f in each)
        rows += [(f'{what}, 1 x {cores} threads', one[key], '', 'one process'),
                 (f'{what}, {cores} x 1 thread', together, f'{together / one[key]:.2f}',
                  ' + '.join(f'{f[key]:.0f}' for f in each))]
    print_table(rows)
    return {'model': args.model, 'size': args.size, 'batch_size': args.batch_size, 'cores': cores,
            'one_process': one, 'one_thread_processes': each, 'load_average': load_average()}


def precision_figures(args, device, m):
    """One precision's images per second (and TFLOP/s, MFU) from measure_precision's figures."""
    step_calls, step_s = m['step']
    f = {'step_img_per_s': step_calls * args.batch_size / step_s, 'step_steps': step_calls,
         'step_tflops': m['flops'] * step_calls / step_s / 1e12,
         'loop_img_per_s': m['loop_img_per_s'], 'loop_steps': m['loop_steps'],
         'predict_img_per_s': m['predict'][0] / m['predict'][1], 'peak_mem_gb': m['peak_gb'],
         'step_compiled_img_per_s': None, 'compile_first_step_s': None,
         'flops_per_step': m['flops']}
    if 'compiled' in m:
        f['step_compiled_img_per_s'] = m['compiled'][0] * args.batch_size / m['compiled'][1]
        f['compile_first_step_s'] = m['compiled'][2]
    f['loop_ratio'] = f['loop_img_per_s'] / f['step_img_per_s']
    f['mfu'] = f['step_tflops'] / args.peak_tflops if device.type == 'cuda' else None
    return f


def precision_rows(args, device, precision, f, fp32):
    """The table's rows of one precision; ratio against fp32 where fp32 was timed too."""
    def vs(key):
        return f'{f[key] / fp32[key]:.2f}x' if fp32 is not None and fp32 is not f else ''
    eval_batch = models.eval_batch(args.batch_size, device)
    rows = [(f'train step, {precision}', f['step_img_per_s'], vs('step_img_per_s'),
             f'eager, one fixed batch, {f["step_steps"]} steps after {args.warmup} warm-up, '
             f'{f["step_tflops"]:.2f} TFLOP/s')]
    if f['step_compiled_img_per_s']:
        rows.append((f'  compiled, {precision}', f['step_compiled_img_per_s'],
                     f'{f["step_compiled_img_per_s"] / f["step_img_per_s"]:.2f}',
                     f'--compile {args.compile}, its first step (compiling) '
                     f'{f["compile_first_step_s"]:.1f} s; ratio: compiled / eager'))
    rows += [(f'train loop, {precision}', f['loop_img_per_s'], vs('loop_img_per_s'),
              f'train.fit, {f["loop_steps"]} steps after a {args.warmup}-step warm-up fit; '
              f'{f["loop_ratio"]:.2f} of the step'),
             (f'predict, {precision}', f['predict_img_per_s'], vs('predict_img_per_s'),
              f'models.predict_ages, batch {eval_batch}')]
    return rows


def report(args, device, measured, load_before, start):
    """The figures as a dict (what --json writes: the top-level figures are those of the last
    precision timed, --precision's choice), and the table on stdout."""
    timed, by_precision, n_images = measured
    speed = {k: timed[k][0] * args.batch_size / timed[k][1] for k in timed}
    ours, naive = speed['ours'], speed['naive']
    figures = {p: precision_figures(args, device, m) for p, m in by_precision.items()}
    chosen = list(figures)[-1]
    result = {
        'model': args.model, 'size': args.size, 'batch_size': args.batch_size,
        'compile': args.compile, 'ema': args.ema, 'device': str(device),
        'device_name': device_name(device), 'precision': chosen, 'torch': torch.__version__,
        'torchvision': torchvision.__version__, 'cpu_threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(),
        'workers': args.workers, 'n_images': n_images, 'data': args.data or 'synthetic',
        'pipeline_ours_img_per_s': ours, 'pipeline_naive_img_per_s': naive,
        'pipeline_ratio': ours / naive, **figures[chosen], 'by_precision': figures,
        'peak_tflops': args.peak_tflops if device.type == 'cuda' else None,
        'load_before': load_before, 'load_after': load_average(), 'seconds': time.time() - start,
    }
    extras = f', compile {args.compile}' if args.compile else ''
    extras += f', EMA {args.ema:g}' if args.ema else ''
    print(f'\n{args.model}, size {args.size}, batch {args.batch_size}{extras}, on {device}: '
          f'{result["device_name"]}')
    print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, '
          f'{torch.get_num_threads()} CPU threads (of {os.cpu_count()}), load average '
          f'{load_before} before, {result["load_after"]} after, {n_images} '
          f'{"images from " + args.data if args.data else "synthetic faces"}')
    rows = [('pipeline (ours)', ours, f'{ours / naive:.1f}x',
             f'uint8 on {device.type}, to_model_input, {timed["ours"][0]} batches'),
            ('pipeline (naive)', naive, '', 'PIL + torchvision, DataLoader with '
                                            f'{args.workers} workers, {timed["naive"][0]} batches')]
    for precision, f in figures.items():
        rows += precision_rows(args, device, precision, f, figures.get('fp32'))
    print_table(rows)
    if device.type == 'cpu' and list(figures) == ['fp32'] and args.precision == 'auto':
        print('bf16 not timed: this CPU has no native bf16 (AVX512-BF16 or AMX) and would emulate '
              'it, far slower; --precision bf16 times it anyway')
    if device.type == 'cuda':
        f = figures[chosen]
        print(f'MFU {100 * f["mfu"]:.1f}% ({f["step_tflops"]:.0f} of {args.peak_tflops:g} TFLOP/s, '
              f'{f["flops_per_step"] / 1e9:.1f} GFLOP per step); peak memory in the loop '
              f'{f["peak_mem_gb"]:.2f} GB')
    return result


def defaults(args, device):
    """(size, batch size): the flags', else train.RECIPE's for the model (the batch by device)."""
    batch = train.RECIPE['batch_cpu' if device.type == 'cpu' else 'batch_gpu'][args.model]
    return args.size or train.RECIPE['size'][args.model], args.batch_size or batch


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seconds, args.min_steps, args.min_loop_steps = min(args.n, 64), 0.2, 3, 3
    args.size = args.size or train.RECIPE['size'][args.model]  # before the size is checked
    cli.check_size(parser, args)
    cli.refuse_overwriting_inputs(parser, '--json', args.json,
                                  [args.data and os.path.join(args.data, 'wiki_labels.csv')])

    def work():
        device = models.pick_device(args.device)
        args.size, args.batch_size = defaults(args, device)
        if args.seconds is None:
            args.seconds = 5.0 if device.type == 'cpu' else 10.0
        log = lambda *a: print(*a, flush=True)  # noqa: E731
        load_before, start = load_average(), time.time()
        log(f'bench: {args.model}, size {args.size}, batch {args.batch_size}, device '
            f'{device} ({device_name(device)}), load average {load_before}')
        if args.training_only:
            precision = models.choose_precision(args.precision, device)[0]
            result = measure_training(args, training_options(args, precision), device, log)
        elif args.side_by_side:
            if device.type != 'cpu':
                raise dataset.UserError('--side-by-side compares CPU threads: use --device cpu')
            result = side_by_side(args, [a for a in argv if a != '--side-by-side'], log)
        else:
            result = report(args, device, measure_all(args, device, log), load_before, start)
        if args.json:
            dataset.write_json(result, args.json)
            print(f'wrote {args.json}')
    return cli.run(work, batch_size=args.batch_size)


if __name__ == '__main__':
    sys.exit(main())
