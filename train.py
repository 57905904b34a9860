"""Train one age regressor on a person-grouped train/validation split.

    python train.py --demo                                   # synthetic faces, on a laptop CPU
    python clean_data.py --data data/wiki                    # once, for the real data
    python train.py --data data/wiki --model resnet50 --loss smoothl1 --out-dir runs/r50
    python train.py --data data/wiki --model cnn --device cpu --time-limit 10
    python train.py --resume runs/r50                        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data data/wiki    # one run on 4 GPUs (DDP)

Top to bottom: the recipe's defaults (RECIPE), `fit` (each epoch `train_epoch`, then `evaluate`,
keeping the best checkpoint), one epoch, validation, the end of a run, and the command line. What
the loop leaves out of sight (progress lines, stopping on a signal or the clock, checkpoints and
--resume) is run_control.py. A run folder gets best.pt (all predict.py needs), history.csv,
metrics.json, val_predictions.csv and two plots; Ctrl-C or SIGTERM saves last.pt, for --resume.
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn

import clean_data
import cli
import dataset
import metrics
import models
import run_control
from run_control import Diverged, Ending

# ----------------------------------------------------------------------------- the recipe

# The defaults of every run, a column per model: the flags of the same name start from them
# (cli.add_train_options), a flag on the command line overrides one entry for one run.
RECIPE = {
    #                    cnn               resnet50
    'weights':      dict(cnn='none',       resnet50='imagenet'),  # fine-tune what ImageNet taught
    'size':         dict(cnn=48,           resnet50=100),  # px: a small cnn gains more from epochs
    'loss':         dict(cnn='dex',        resnet50='smoothl1'),  # both forgive a wrong label
    'lr':           dict(cnn=1e-3,         resnet50=1e-3),  # AdamW's peak: the head, or all layers
    'backbone_lr':  dict(cnn=None,         resnet50=None),  # None: lr/10 if pretrained, else lr
    'weight_decay': dict(cnn=1e-4,         resnet50=1e-4),  # of conv and linear weights only
    'batch_cpu':    dict(cnn=32,           resnet50=32),  # small: a step stays in the caches
    'batch_gpu':    dict(cnn=128,          resnet50=128),  # a GPU needs many images to be busy
    'epochs':       dict(cnn=30,           resnet50=30),
    'warmup':       dict(cnn=0.1,          resnet50=0.1),  # share of the steps the lr ramps up over
    'warmup_epochs': dict(cnn=3,           resnet50=3),  # ... but at most this many epochs
    'dex_sigma':    dict(cnn=6.0,          resnet50=6.0),  # years: as noisy as wiki's ages
    'widths':       dict(cnn=(32, 64, 128, 256), resnet50=None),  # channels of each conv block
    'dropout':      dict(cnn=0.2,          resnet50=None),  # before the head; resnet50 has none
    # augmentation, drawn afresh for every image: a face moves, turns and changes light
    'crop_area':    dict(cnn=(0.7, 1.0),   resnet50=(0.7, 1.0)),  # share of the face a crop keeps
    'crop_aspect':  dict(cnn=(0.9, 1.1),   resnet50=(0.9, 1.1)),  # width over height of the crop
    'rotation':     dict(cnn=10.0,         resnet50=10.0),  # degrees either way
    'flip':         dict(cnn=0.5,          resnet50=0.5),  # a mirrored face is as old
    'brightness':   dict(cnn=(0.8, 1.2),   resnet50=(0.8, 1.2)),
    'contrast':     dict(cnn=(0.8, 1.2),   resnet50=(0.8, 1.2)),
}
AUGMENTATION = ('crop_area', 'crop_aspect', 'rotation', 'flip', 'brightness', 'contrast')

# What --demo changes: synthetic faces from scratch, sized to finish in minutes on a laptop CPU and
# ended by epochs (not minutes), so that every machine prints the same numbers. Not the recipe.
DEMO = {
    #                    cnn               resnet50
    'weights':      dict(cnn='none',       resnet50='none'),  # nothing to download
    'size':         dict(cnn=64,           resnet50=32),
    'lr':           dict(cnn=2e-3,         resnet50=2e-3),
    'batch_size':   dict(cnn=32,           resnet50=48),  # ResNet-50's 32 px steps are small
    'epochs':       dict(cnn=25,           resnet50=15),  # train.py
    'cv_epochs':    dict(cnn=10,           resnet50=6),  # each run of cv.py
}


def fit(args, rows, out_dir, device, resume=None, log=print, rank=0, world=1):
    """Train on rows.train, validate on rows.val after every epoch, keep the best in best.pt.

    rows: what make_rows returns. rank, world: this process of a torchrun job. Returns a dict of
    final metrics. Raises Diverged on a NaN/inf loss, SystemExit after a signal (last.pt saved)."""
    run = start_run(args, rows, out_dir, device, rank, world, log)
    if resume is not None:
        run_control.restore(run, resume)
    run.schedule.begin(args.time_limit, epochs_before=len(run.progress.history))
    log_start(run)
    ending = Ending.COMPLETED
    with run_control.Signals.catching():
        while ending is Ending.COMPLETED and run.progress.epoch < run.schedule.epochs:
            epoch = run.progress.epoch
            train_loss, ending = train_epoch(run, epoch)
            if ending is Ending.SIGNAL:
                run_control.save_last_and_exit(run, epoch)
            scores = evaluate(run)[0] if len(rows.val) else None  # --val-frac 0: none
            improved = record_epoch(run, epoch, ending, train_loss, scores)
            run_control.save_epoch(run, epoch, improved, ending)
            if ending is Ending.COMPLETED and 0 < args.patience <= run.progress.bad_epochs:
                log(f'early stop: no better val RMSE for {args.patience} epochs')
                ending = Ending.EARLY_STOP
    if ending is Ending.TIME_LIMIT:
        log(f'time limit of {args.time_limit:g} min reached')
    return finish(run, ending)


# ----------------------------------------------------------------------------- a run's pieces

@dataclasses.dataclass
class Rows:
    """What a run trains on and scores: the whole image array and positions of rows in it."""
    images: torch.Tensor         # uint8 (N, 100, 100), on the device when it fits
    ages: torch.Tensor           # float32 years of the N rows, next to the images
    train: torch.Tensor          # positions of the training rows
    val: np.ndarray              # positions of the validation rows (test-like)
    val_ages: np.ndarray         # their true ages, in float64 as the CSV has them
    val_ids: np.ndarray
    val_clean: np.ndarray        # which of them pass the old cleaning (clean_data.clean_only)
    draw_weights: torch.Tensor   # --balance-gender: each training row's weight, else None
    age_mean: float              # of the training rows: the model learns (age - mean) / std
    age_std: float


@dataclasses.dataclass
class Learner:
    """The model and what trains it."""
    model: nn.Module             # saved, evaluated and restored
    step_model: nn.Module        # what a step calls: `model` wrapped for DDP or torch.compile
    ema: nn.Module               # --ema: the moving average (validated and saved), else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    aug: torch.Generator         # the augmentation draws; None with --no-augment
    augment: dict                # the augmentation strengths of the recipe
    precision: str               # 'fp32', 'bf16' or 'fp16': what autocast computes in
    precision_why: str           # why that one (--precision auto chooses by the device)

    def evaluated(self):
        """The model that is validated and saved in best.pt: the moving average with --ema."""
        return self.ema.module if self.ema is not None else self.model


@dataclasses.dataclass
class Schedule:
    """Steps, and the clock of a time limit: what the learning rate follows."""
    batch: int                   # images per step in each process
    steps_per_epoch: int
    epochs: float                # --epochs, or inf when --time-limit alone ends the run
    total_steps: int             # where the lr reaches zero; None: at the deadline
    warmup_steps: int
    start: float = None          # time.time() when this session's training started
    deadline: float = None       # time.time() at --time-limit, else None
    epochs_before: int = 0       # epochs done before this session (resumed)

    def begin(self, time_limit, epochs_before):
        self.start, self.epochs_before = time.time(), epochs_before
        self.deadline = self.start + time_limit * 60 if time_limit else None

    def elapsed(self):
        return time.time() - self.start

    def time_fraction(self):
        return (time.time() - self.start) / (self.deadline - self.start) if self.deadline else 0.0


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    rows: Rows
    learner: Learner
    schedule: Schedule
    progress: run_control.Progress
    out_dir: str
    device: torch.device
    rank: int                    # this process, of `world` (torchrun); 0 of 1 otherwise
    world: int
    log: callable


def recipe_of(model):
    """The model's column of RECIPE: {'weights': 'none', 'size': 48, ...} for the cnn."""
    return {key: column[model] for key, column in RECIPE.items()}


def start_run(args, rows, out_dir, device, rank, world, log):
    recipe = recipe_of(args.model)
    learner = build_learner(args, recipe, rows.age_mean, rows.age_std, device, world, log)
    batch = max(1, args.batch_size // world)
    steps_per_epoch = max(1, len(rows.train) // world // batch)
    total = args.epochs * steps_per_epoch if args.epochs else None
    schedule = Schedule(batch=batch, steps_per_epoch=steps_per_epoch,
                        epochs=args.epochs or math.inf,
                        total_steps=total,
                        warmup_steps=warmup_steps(total, steps_per_epoch, recipe))
    return Run(args=args, rows=rows, learner=learner, schedule=schedule,
               progress=run_control.Progress(),
               out_dir=out_dir, device=device, rank=rank, world=world, log=log)


def warmup_steps(total_steps, steps_per_epoch, recipe):
    """The recipe's share of the run's steps, at most its number of epochs; None without a step
    count (--time-limit alone: lr_factor then warms up on the clock)."""
    if total_steps is None:
        return None
    return min(int(total_steps * recipe['warmup']), recipe['warmup_epochs'] * steps_per_epoch)


def make_rows(args, images, table, train_rows, val_rows):
    """The Rows of a split: images, the clean table of the same rows, and the two parts'
    positions."""
    ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
    train_rows = torch.as_tensor(train_rows)
    train_ages = ages[train_rows.to(ages.device)]
    val_rows = np.asarray(val_rows, dtype=np.int64)
    weights = None
    if args.balance_gender:
        weights = draw_weights(table['gender'].to_numpy()[train_rows.numpy()])
    return Rows(images=images, ages=ages, train=train_rows, val=val_rows,
                val_ages=table['age'].to_numpy()[val_rows],
                val_ids=table['ID'].to_numpy()[val_rows],
                val_clean=clean_data.clean_only(table.iloc[val_rows]), draw_weights=weights,
                age_mean=float(train_ages.mean()),
                age_std=float(train_ages.std()) if len(train_rows) > 1 else 1.0)


def draw_weights(gender):
    """--balance-gender: male and female rows get equal total weight; unknown keeps its share."""
    gender = np.asarray(gender, dtype=float)
    w = np.ones(len(gender))
    male, female = gender == 1, gender == 0
    known = male.sum() + female.sum()
    if male.any() and female.any():
        w[male] = known / 2 / male.sum()
        w[female] = known / 2 / female.sum()
    return torch.from_numpy(w)


def build_learner(args, recipe, age_mean, age_std, device, world=1, log=print):
    torch.manual_seed(args.seed)  # the initial weights (and dropout) draw from the global generator
    bins = models.AGE_BINS if args.loss == 'dex' else 0
    model = models.build_model(args.model, args.weights, age_mean, max(age_std, 1e-3), bins,
                               recipe['widths'], recipe['dropout'])
    model = models.place(model, device)
    step_model = model
    if world > 1:
        ids = [device.index] if device.type == 'cuda' else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        step_model = models.compile_model(step_model, args.compile, device, log)
    ema = None
    if args.ema:
        average = torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    precision, why = models.choose_precision(args.precision, device, args.demo)
    optimizer, scaler = models.build_optimizer(model, args.lr, backbone_lr(args), args.weight_decay,
                                               device, precision)
    criterion = models.make_criterion(args.loss, age_mean, age_std, recipe['dex_sigma'])
    return Learner(model=model, step_model=step_model, ema=ema, optimizer=optimizer, scaler=scaler,
                   criterion=criterion,
                   aug=None if args.no_augment else torch.Generator(device=device),
                   augment={key: recipe[key] for key in AUGMENTATION}, precision=precision,
                   precision_why=why)


def backbone_lr(args):
    """A pretrained backbone learns 10x slower than the new head, so that fine-tuning keeps what
    ImageNet taught it; from scratch all layers share --lr."""
    if args.backbone_lr:
        return args.backbone_lr
    return args.lr / 10 if args.weights not in (None, 'none') else args.lr


def log_start(run):
    args, s = run.args, run.schedule
    lr = f'{args.lr:g}'
    if backbone_lr(args) != args.lr:
        lr += f' (head), {backbone_lr(args):g} (pretrained backbone)'
    length = f'{args.epochs} epochs' if args.epochs else \
        f'epochs until the {args.time_limit:g}-minute limit'
    processes = f', {run.world} processes' if run.world > 1 else ''
    ema = f', EMA {args.ema:g}' if args.ema else ''
    learner = run.learner
    run.log(f'training {args.model} on {len(run.rows.train)} images, validating on '
            f'{len(run.rows.val)} ({s.steps_per_epoch} steps/epoch x {length}, batch '
            f'{s.batch * run.world}, device {run.device}{processes}, {learner.precision}: '
            f'{learner.precision_why}); peak learning rate {lr}, loss {args.loss}{ema}, '
            f'validation TTA {"off" if args.no_tta else "on"}')


# ----------------------------------------------------------------------------- one epoch

def train_epoch(run, epoch):
    """One pass over the training rows in a fresh order, from run.progress.step (not 0 when
    resumed mid-epoch). Returns (the epoch's mean training loss, why it ended)."""
    args, rows, learner, s = run.args, run.rows, run.learner, run.schedule
    order = epoch_order(run, epoch)
    clock = run_control.start_epoch(run, epoch)
    learner.step_model.train()
    for step in range(run.progress.step, s.steps_per_epoch):
        idx = order[step * s.batch:(step + 1) * s.batch]
        x = dataset.to_model_input(rows.images[idx].to(run.device, non_blocking=True), args.size,
                                   models.INPUT_CHANNELS[args.model], learner.aug, learner.augment)
        y = (rows.ages[idx].to(run.device, non_blocking=True) - rows.age_mean) / rows.age_std
        lr = lr_factor(epoch * s.steps_per_epoch + step, s.total_steps, s.warmup_steps,
                       s.time_fraction())
        for group in learner.optimizer.param_groups:
            group['lr'] = group['initial_lr'] * lr
        loss = train_step(learner, x, y)
        ending = run_control.after_step(run, clock, epoch, step + 1, loss)
        if ending is not Ending.COMPLETED:
            return run_control.end_epoch(run, clock, epoch), ending
    return run_control.end_epoch(run, clock, epoch), Ending.COMPLETED


def epoch_order(run, epoch):
    """This process's training rows for one epoch: a permutation, or with --balance-gender a
    weighted draw with replacement. Seeded by (seed, epoch) alone: a resumed run draws the same."""
    g = torch.Generator().manual_seed(run.args.seed * 100_003 + epoch)
    n, weights = len(run.rows.train), run.rows.draw_weights
    if weights is None:
        order = torch.randperm(n, generator=g)
    else:
        order = torch.multinomial(weights, n, replacement=True, generator=g)
    return run.rows.train[order[run.rank::run.world]].to(run.rows.images.device)


def lr_factor(step, total_steps, warmup_steps, time_fraction=0.0):
    """The learning rate at `step` (from 0) as a fraction of the peak: a linear warm-up over
    warmup_steps, then a cosine decay that reaches zero at total_steps. Under --time-limit the run
    is as far along as the larger of its step and its time fraction, so a run that fits fewer
    steps than total_steps still finishes its warm-up and decay at the limit; without --epochs
    (total_steps None) its time alone says how far along it is, on a scale of 1000 steps, the
    first tenth warming up."""
    if total_steps is None:
        step, total_steps, warmup_steps = 0, 1000, 100
    step = min(max(step, time_fraction * total_steps), total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def train_step(learner, x, y):
    """Forward, loss, backward, optimizer step. Returns the loss as a tensor (no GPU sync)."""
    with models.autocast(x.device, learner.precision):
        out = learner.step_model(x)
    loss = learner.criterion(out.float(), y)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return loss.detach()


# ----------------------------------------------------------------------------- validation

VAL_SCORES = ('rmse', 'mae', 'r2', 'rmse_clean')  # history.csv, metrics.json: val_rmse, ...


def evaluate(run):
    """Validation scores and predictions. Process 0 evaluates (its model is the one saved in
    best.pt) and sends the scores to the others, so every process makes the same decisions.
    rmse_clean: the RMSE on the rows the old cleaning kept, to compare with earlier numbers."""
    scores, pred = None, None
    rows, args = run.rows, run.args
    if run.rank == 0:
        batch = models.eval_batch(run.schedule.batch, run.device)
        pred = models.predict_ages(run.learner.evaluated(), rows.images, rows.val, args.size,
                                   models.INPUT_CHANNELS[args.model], batch, run.device,
                                   tta=not args.no_tta, precision=run.learner.precision).numpy()
        scores = metrics.scores(rows.val_ages, pred)
        clean = rows.val_clean
        clean_rmse = metrics.scores(rows.val_ages[clean], pred[clean])['rmse']
        scores['rmse_clean'] = clean_rmse if clean.any() else math.nan
    if run.world > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    if not math.isfinite(scores['rmse']):
        raise Diverged(f'the validation RMSE is not finite after epoch {run.progress.epoch + 1}; '
                       'stopping (try a lower --lr)')
    return scores, pred


def val_columns(scores=None):
    """{'val_rmse': ..., 'val_mae': ..., ...}: the scores as the run's files name them; NaN for
    a run without validation (scores None)."""
    return {f'val_{key}': scores[key] if scores else math.nan for key in VAL_SCORES}


def record_epoch(run, epoch, ending, train_loss, scores):
    """Add the epoch to the history; returns whether it is the best so far. Without validation
    (scores None) there is nothing to choose by, and the latest model is the one kept."""
    progress = run.progress
    improved = scores is None or scores['rmse'] < progress.best_val_rmse
    if ending is Ending.COMPLETED:
        progress.epoch += 1
    progress.step = 0
    progress.history.append({
        'epoch': epoch + 1, 'train_loss': train_loss, **val_columns(scores),
        'lr': run.learner.optimizer.param_groups[0]['lr'],
        'img_per_s': progress.train_images / max(progress.train_seconds, 1e-9),
        'seconds': run.schedule.elapsed()})
    if improved:
        progress.best_val_rmse = scores['rmse'] if scores else math.nan
        progress.best_epoch, progress.bad_epochs = epoch + 1, 0
    else:
        progress.bad_epochs += 1
    return improved


# ----------------------------------------------------------------------------- the end of a run

def finish(run, ending):
    """Score the best checkpoint once more and write the run's files: metrics.json (with the RMSE
    per age decade), val_predictions.csv and the two plots. last.pt goes. Returns the result,
    with the validation predictions under 'val_pred'."""
    p, rows = run.progress, run.rows
    result = {'val_rmse': None, 'best_epoch': p.best_epoch, 'epochs_run': len(p.history),
              'stopped': ending.value,
              'train_img_per_s': p.train_images / max(p.train_seconds, 1e-9),
              'seconds': run.schedule.elapsed(), 'n_train': len(rows.train), 'n_val': len(rows.val),
              'device': str(run.device), 'world_size': run.world, 'model': run.args.model,
              'size': run.args.size, 'precision': run.learner.precision,
              'precision_why': run.learner.precision_why}
    pred = None
    if len(rows.val):
        if run.rank == 0:
            best = models.load_checkpoint(os.path.join(run.out_dir, 'best.pt'))
            run.learner.evaluated().load_state_dict(best['model'])
        scores, pred = evaluate(run)
        result.update(val_columns(scores), n_val_clean=int(rows.val_clean.sum()))
    if run.rank == 0:
        if pred is not None:
            dataset.write_csv(pd.DataFrame({'ID': rows.val_ids, 'age': rows.val_ages,
                                            'prediction': pred}),
                              os.path.join(run.out_dir, 'val_predictions.csv'))
            title = f'{run.args.model}, validation, best epoch {p.best_epoch}'
            result['rmse_by_decade'] = metrics.report(
                os.path.join(run.out_dir, 'predictions.png'),
                os.path.join(run.out_dir, 'error_by_decade.png'), rows.val_ages, pred, title,
                run.log)
        dataset.write_json(result, os.path.join(run.out_dir, 'metrics.json'))
        last = os.path.join(run.out_dir, 'last.pt')
        if os.path.exists(last):  # the run is complete: nothing to resume
            os.remove(last)
    result.pop('rmse_by_decade', None)
    return {**result, 'val_pred': pred}


# ----------------------------------------------------------------------------- the command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_train_options(parser, RECIPE, DEMO)
    parser.add_argument('--val-frac', type=cli.number(at_least=0, at_most=0.5), default=0.2,
                        help='validation share, grouped by person (1/round(1/val_frac) of the '
                             'people); 0: train the final model on every row for --epochs, with no '
                             'validation')
    parser.add_argument('--out-dir', help='run directory (default: runs/MODEL-LOSS-DATE-TIME, or '
                                          'runs/demo-DATE-TIME)')
    parser.add_argument('--resume', metavar='RUN_DIR',
                        help='continue the run saved in RUN_DIR/last.pt with its saved options '
                             '(only --device, --time-limit, --log-every and --threads may change)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    resume = None
    if args.resume:
        args, resume = cli.resumed_options(parser, args, build_parser())
        if resume is None:
            return 1
    else:
        name = 'demo' if args.demo else f'{args.model}-{args.loss}'
        args.out_dir = args.out_dir or os.path.join('runs',
                                                    f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
        if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
            parser.error(f'--out-dir {args.out_dir} already holds a run; choose a new --out-dir, '
                         f'or continue it with --resume {args.out_dir}')
    return cli.run(lambda: train_command(args, resume), batch_size=args.batch_size)


def train_command(args, resume):
    with models.distributed(args.device) as (rank, world, device), models.cpu_threads(args.threads):
        if world > 1:  # the ranks may have stamped their default --out-dir a second apart
            out_dir = [args.out_dir]
            dist.broadcast_object_list(out_dir, src=0)
            args.out_dir = out_dir[0]
        log = cli.log_on(rank)
        table, images = dataset.load_table(args, log, rank, world)
        train_rows, val_rows = clean_data.split(args, table)
        with cli.output_folder(args.out_dir):  # made only now that the inputs are checked
            images = dataset.place_images(images, device, log)
            rows = make_rows(args, images, table, train_rows, val_rows)
            try:
                result = fit(args, rows, args.out_dir, device, resume, log, rank, world)
            except SystemExit:  # a signal: last.pt is saved
                log(f'continue with: python train.py --resume {args.out_dir}')
                raise
    speed = f'{result["train_img_per_s"]:.0f} img/s, {run_control.fmt_time(result["seconds"])}'
    if result['val_rmse'] is None:
        log(f'done: trained on all {result["n_train"]} rows for {result["epochs_run"]} epochs, '
            f'no validation ({speed}); run saved in {args.out_dir}')
    else:
        log(f'done: val RMSE {result["val_rmse"]:.3f}  MAE {result["val_mae"]:.3f}  R^2 '
            f'{result["val_r2"]:.3f} on {result["n_val"]} test-like rows (best epoch '
            f'{result["best_epoch"]}, {speed}); run saved in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
