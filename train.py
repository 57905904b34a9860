"""Train one age regressor on a person-grouped train/validation split.

    python train.py --demo                                   # synthetic faces, on a laptop CPU
    python clean_data.py --data data/wiki                    # once, for the real data
    python train.py --data data/wiki --model resnet50 --loss smoothl1 --out-dir runs/r50
    python train.py --data data/wiki --model cnn --device cpu --time-limit 10
    python train.py --resume runs/r50                        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data data/wiki    # one run on 4 GPUs (DDP)

Top to bottom, in the order it runs: the recipe (RECIPE), `fit`, a run's pieces, one epoch,
validation and best.pt, the end of a run, the command line. A first read may skip run_control.py
(Ctrl-C, SIGTERM, last.pt for --resume). A run folder gets best.pt (all predict.py needs),
history.csv, metrics.json, val_predictions.csv and two plots.
"""
import argparse
import contextlib
import dataclasses
import enum
import math
import os
import sys
import time

import pandas as pd
import torch
import torch.distributed as dist

import clean_data
import cli
import dataset
import demo_data
import metrics
import models
import run_control

# ----------------------------------------------------------------------------- the recipe

# The defaults of every run, a column per model: the flags of the same name start from them
# (cli.parse_args), a flag on the command line overrides one entry for one run.
RECIPE = {
    #                    cnn               resnet50
    'weights':      dict(cnn='none',       resnet50='imagenet'),  # fine-tune what ImageNet taught
    'widths':       dict(cnn=(32, 64, 128, 256), resnet50=None),  # channels of the cnn's blocks
    'dropout':      dict(cnn=0.2,          resnet50=None),  # before the cnn's head (ResNet: none)
    'size':         dict(cnn=48,           resnet50=100),  # px: a small cnn gains more from epochs
    'loss':         dict(cnn='dex',        resnet50='smoothl1'),  # both forgive a wrong label
    'dex_sigma':    dict(cnn=6.0,          resnet50=6.0),  # years: as noisy as wiki's ages
    'lr':           dict(cnn=1e-3,         resnet50=1e-3),  # AdamW's peak: the head, or all layers
    'backbone_lr_share': dict(cnn=0.1,     resnet50=0.1),  # of lr, for a pretrained backbone
    'weight_decay': dict(cnn=1e-4,         resnet50=1e-4),  # of conv and linear weights only
    'ema':          dict(cnn=0.0,          resnet50=0.0),  # a moving average of the weights: off
    'batch_cpu':    dict(cnn=32,           resnet50=32),  # small: a step stays in the caches
    'batch_gpu':    dict(cnn=128,          resnet50=128),  # a GPU needs many images to be busy
    'epochs':       dict(cnn=30,           resnet50=30),
    'warmup':       dict(cnn=0.1,          resnet50=0.1),  # share of the run the lr ramps up over
    'warmup_epochs': dict(cnn=3,           resnet50=3),  # ... but at most this many epochs
    'patience':     dict(cnn=0,            resnet50=0),  # 0: no early stop: a cosine ends best
    'tta':          dict(cnn=True,         resnet50=True),  # validate a face with its mirror image
    'val_frac':     dict(cnn=0.2,          resnet50=0.2),  # train.py: a fifth of the people
    'folds':        dict(cnn=5,            resnet50=5),  # cv.py
    # which rows train (validation scores every test-like row, as the test set has them)
    'train_min_face_score': dict(cnn=1.0,  resnet50=1.0),  # a weak face is often not the person
    'train_keep_second_face': dict(cnn=False, resnet50=False),  # which face is labelled?
    # augmentation, drawn afresh for every image: a face moves, turns and changes light
    'crop_area':    dict(cnn=(0.7, 1.0),   resnet50=(0.7, 1.0)),  # share of the face a crop keeps
    'crop_aspect':  dict(cnn=(0.9, 1.1),   resnet50=(0.9, 1.1)),  # width over height of the crop
    'rotation':     dict(cnn=10.0,         resnet50=10.0),  # degrees either way
    'flip':         dict(cnn=0.5,          resnet50=0.5),  # a mirrored face is as old
    'brightness':   dict(cnn=(0.8, 1.2),   resnet50=(0.8, 1.2)),
    'contrast':     dict(cnn=(0.8, 1.2),   resnet50=(0.8, 1.2)),
}
AUGMENTATION = ('crop_area', 'crop_aspect', 'rotation', 'flip', 'brightness', 'contrast')

# What --demo changes (not the recipe): synthetic faces from scratch, a few minutes on a laptop,
# ended by epochs and in fp32, so that a machine's speed or bf16 unit does not change its numbers.
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
    """Train on rows.train (clean_data.make_rows), validate on rows.val after every epoch, keep
    the best in best.pt. resume: a last.pt to continue; rank, world: this process of a torchrun
    job. Returns the final metrics. Raises Diverged on a NaN/inf loss, SystemExit after Ctrl-C or
    SIGTERM (last.pt saved)."""
    run = start_run(args, rows, out_dir, device, rank, world, log)
    if resume is not None:
        resume_from(run, resume)
    run.schedule.begin(args.time_limit, epochs_before=len(run.progress.history))
    log_start(run)
    ending = Ending.COMPLETED
    with run_control.guarding(run.out_dir, run.saved) as signals:  # Ctrl-C, SIGTERM, full disk
        while ending is Ending.COMPLETED and run.progress.epoch < run.schedule.epochs:
            epoch = run.progress.epoch
            train_loss, ending = train_epoch(run, epoch, signals)
            if ending is Ending.SIGNAL:
                log(f'saved {save_last(run)} at epoch {epoch + 1} step {run.progress.step}')
                raise SystemExit(signals.exit_code())
            scores = evaluate(run)[0] if len(rows.val) else None  # --val-frac 0: none
            improved = record_epoch(run, epoch, ending, train_loss, scores)
            save_epoch(run, epoch, improved)
            if ending is Ending.COMPLETED and run.progress.epoch < run.schedule.epochs:
                save_last(run)
            if ending is Ending.COMPLETED and 0 < args.patience <= run.progress.bad_epochs:
                log(f'early stop: no better val RMSE for {args.patience} epochs')
                ending = Ending.EARLY_STOP
    if ending is Ending.TIME_LIMIT:
        log(f'time limit of {args.time_limit:g} min reached')
    return finish(run, ending)


# ----------------------------------------------------------------------------- a run's pieces

class Ending(enum.Enum):
    """Why an epoch, and so a run, ended: metrics.json's 'stopped'."""
    COMPLETED = 'completed'
    TIME_LIMIT = 'time_limit'
    SIGNAL = 'signal'
    EARLY_STOP = 'early_stop'


class Diverged(dataset.UserError):
    """The loss or the validation error stopped being a finite number."""


@dataclasses.dataclass
class Schedule:
    """Steps, and the clock of a time limit: what the learning rate follows."""
    batch: int                   # images per step in each process
    steps_per_epoch: int
    epochs: float                # --epochs, or inf when --time-limit alone ends the run
    total_steps: int             # where the lr reaches zero; None: at the deadline
    warmup: float                # the recipe's warm-up: a share of the run ...
    warmup_steps: int            # ... of at most this many steps
    start: float = None          # time.time() when this session's training started
    deadline: float = None       # time.time() at --time-limit, else None
    epochs_before: int = 0       # epochs done before this session (resumed)

    def begin(self, time_limit, epochs_before):
        self.start, self.epochs_before = time.time(), epochs_before
        self.deadline = self.start + time_limit * 60 if time_limit else None

    def time_fraction(self):
        return (time.time() - self.start) / (self.deadline - self.start) if self.deadline else 0.0


@dataclasses.dataclass
class Progress:
    """Where training stands: what last.pt saves and --resume restores."""
    epoch: int = 0               # epochs completed
    step: int = 0                # steps done in the current epoch (not 0 after a stop mid-epoch)
    best_val_rmse: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0          # epochs since the best one
    history: list = dataclasses.field(default_factory=list)  # a row per epoch: history.csv
    loss_sum: float = 0.0        # the training loss of the current epoch's steps, summed
    train_images: int = 0
    train_seconds: float = 0.0


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    rows: clean_data.Rows
    learner: models.Learner
    augment_rng: torch.Generator  # the augmentation's random draws; None with --no-augment
    strengths: dict              # the augmentation's strengths, from the recipe
    schedule: Schedule
    progress: Progress
    out_dir: str
    device: torch.device
    rank: int                    # this process, of `world` (torchrun); 0 of 1 otherwise
    world: int
    log: callable
    saved: dict = dataclasses.field(default_factory=dict)  # 'best.pt', 'last.pt': their epoch


def recipe_of(model):
    """The model's column of RECIPE: {'weights': 'none', 'size': 48, ...} for the cnn."""
    return {key: column[model] for key, column in RECIPE.items()}


def start_run(args, rows, out_dir, device, rank, world, log):
    recipe = recipe_of(args.model)
    learner = models.build_learner(args, recipe, rows.age_mean, rows.age_std, device, world, log)
    batch = max(1, args.batch_size // world)
    steps_per_epoch = max(1, len(rows.train) // world // batch)
    total = args.epochs * steps_per_epoch if args.epochs else None
    schedule = Schedule(batch=batch, steps_per_epoch=steps_per_epoch,
                        epochs=args.epochs or math.inf, total_steps=total,
                        warmup=recipe['warmup'],
                        warmup_steps=recipe['warmup_epochs'] * steps_per_epoch)
    return Run(args=args, rows=rows, learner=learner, schedule=schedule, progress=Progress(),
               augment_rng=None if args.no_augment else torch.Generator(device=device),
               strengths={key: recipe[key] for key in AUGMENTATION},
               out_dir=out_dir, device=device, rank=rank, world=world, log=log)


def log_start(run):
    args, s, learner = run.args, run.schedule, run.learner
    lr, backbone = f'{args.lr:g}', models.backbone_lr(args, recipe_of(args.model))
    if backbone != args.lr:
        lr += f' (head), {backbone:g} (pretrained backbone)'
    length = f'{args.epochs} epochs' if args.epochs else f'until the {args.time_limit:g} minutes'
    processes = f', {run.world} processes' if run.world > 1 else ''
    run.log(f'training {args.model} on {len(run.rows.train)} images, validating on '
            f'{len(run.rows.val)} ({s.steps_per_epoch} steps/epoch x {length}, batch '
            f'{s.batch * run.world}, device {run.device}{processes}, {learner.precision}: '
            f'{learner.precision_why}); peak learning rate {lr}, loss {args.loss}'
            + (f', EMA {args.ema:g}' if args.ema else '') + f', TTA {"on" if args.tta else "off"}')


# ----------------------------------------------------------------------------- one epoch

def train_epoch(run, epoch, signals):
    """One pass over the training rows in a fresh order, from run.progress.step (not 0 when
    resumed mid-epoch), a progress line every --log-every steps; Ctrl-C or SIGTERM (`signals`)
    or the clock end it after the current step. Returns (the mean training loss, why it ended)."""
    args, rows, learner, s, p = run.args, run.rows, run.learner, run.schedule, run.progress
    order = epoch_order(run, epoch)
    if p.step == 0:  # a fresh epoch, not one resumed mid-way
        p.loss_sum = 0.0
        if run.augment_rng is not None:
            run.augment_rng.manual_seed(augmentation_seed(run, epoch, 0))
    first, start, ending = p.step, time.time(), Ending.COMPLETED
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no GPU sync a step
    read = (first, 0.0)  # the last step whose loss was read, and loss_sum then
    line = (start, first)  # the time and step of the last progress line
    learner.step_model.train()
    for step in range(first, s.steps_per_epoch):
        idx = order[step * s.batch:(step + 1) * s.batch]
        x = dataset.to_model_input(rows.images[idx].to(run.device, non_blocking=True), args.size,
                                   models.INPUT_CHANNELS[args.model], run.augment_rng,
                                   run.strengths)
        y = (rows.ages[idx].to(run.device, non_blocking=True) - rows.age_mean) / rows.age_std
        factor = lr_factor(epoch * s.steps_per_epoch + step, s)
        for group in learner.optimizer.param_groups:
            group['lr'] = group['initial_lr'] * factor
        loss_sum += train_step(learner, x, y)
        p.step = done = step + 1
        at_line = done % args.log_every == 0 or done == s.steps_per_epoch
        stop = stop_reason(run, signals)
        if at_line or (stop and run.world == 1):  # several processes agree at progress lines only
            loss, stop = read_loss(run, epoch, done, read[0], loss_sum, stop)
            read = (done, loss)
            if at_line:
                log_progress(run, epoch, done, line, loss)
                line = (time.time(), done)
            if stop:
                ending = stop
                break
    p.loss_sum += read[1]
    p.train_images += (p.step - first) * s.batch * run.world
    p.train_seconds += time.time() - start
    return p.loss_sum / max(p.step, 1), ending


def epoch_order(run, epoch):
    """This process's training rows for one epoch: a permutation (--balance-gender: a weighted
    draw), seeded by (seed, epoch) alone, so that a resumed run draws the same."""
    g = torch.Generator().manual_seed(run.args.seed * 100_003 + epoch)
    n, weights = len(run.rows.train), run.rows.draw_weights
    if weights is None:
        order = torch.randperm(n, generator=g)
    else:
        order = torch.multinomial(weights, n, replacement=True, generator=g)
    return run.rows.train[order[run.rank::run.world]].to(run.rows.images.device)


def augmentation_seed(run, epoch, step):
    """The augmentation draws from (seed, epoch, step, rank): a fresh epoch starts at step 0."""
    return run.args.seed * 1_000_003 + epoch * 101 + step * 7 + run.rank


def lr_factor(step, s):
    """The learning rate at `step` (from 0) as a fraction of the peak: a linear warm-up over the
    recipe's share of the run (at most s.warmup_steps), then a cosine decay to zero at the end.
    A run is as far along as the larger of its step (of s.total_steps) and its share of the time
    limit; with the time alone (no --epochs) the peak holds from s.warmup_steps to that share."""
    if s.total_steps is None:
        done = s.time_fraction()
        if done < s.warmup and step < s.warmup_steps:
            return min(1.0, max(done / s.warmup, (step + 1) / s.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * min(max(done - s.warmup, 0) / (1 - s.warmup), 1)))
    warmup_steps = min(int(s.total_steps * s.warmup), s.warmup_steps)
    step = min(max(step, s.time_fraction() * s.total_steps), s.total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, s.total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def train_step(learner, x, y):
    """Forward, loss, backward, optimizer step. Returns the loss as a tensor (no GPU sync)."""
    with models.autocast(x.device, learner.precision):
        out = learner.step_model(x)
    loss = learner.criterion(out.float(), y)  # the loss in fp32, whatever autocast computed
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return loss.detach()


def stop_reason(run, signals):
    """Ending.SIGNAL after Ctrl-C or SIGTERM, Ending.TIME_LIMIT past --time-limit, else None."""
    if signals.caught is not None:
        return Ending.SIGNAL
    deadline = run.schedule.deadline
    return Ending.TIME_LIMIT if deadline and time.time() > deadline else None


def read_loss(run, epoch, done, checked, loss_sum, stop):
    """(the loss summed over this session's steps of the epoch, why to stop or None), read from
    the device (a GPU sync). Under torchrun one all-reduce averages the loss and tells every
    process whether any wants to stop, so all stop at the same step. A NaN/inf ends the run."""
    votes = [float(stop is Ending.SIGNAL), float(stop is Ending.TIME_LIMIT)]
    shared = torch.stack([loss_sum.float(), *torch.tensor(votes, device=loss_sum.device)])
    if run.world > 1:
        dist.all_reduce(shared)
        shared[0] /= run.world
    total, signal, clock = shared.tolist()
    if not math.isfinite(total):
        where = f'step {done}' if checked + 1 == done else f'steps {checked + 1}-{done}'
        best = os.path.join(run.out_dir, 'best.pt')
        kept = f'the best checkpoint so far is kept in {best}' if 'best.pt' in run.saved else \
            'no checkpoint was saved'
        raise Diverged(f'the loss became NaN/inf at epoch {epoch + 1} {where}; stopping ({kept}). '
                       'Try a lower --lr')
    return total, Ending.SIGNAL if signal else Ending.TIME_LIMIT if clock else None


def log_progress(run, epoch, done, line, loss_read):
    """The progress line: the epoch's mean loss so far, images/s since the last line, time left."""
    s, p = run.schedule, run.progress
    since, last = line
    seconds_per_step = (time.time() - since) / (done - last)
    mean_loss = (p.loss_sum + loss_read) / done
    steps_left = (s.epochs - epoch) * s.steps_per_epoch - done
    lr = run.learner.optimizer.param_groups[0]['lr']
    run.log(f'epoch {epoch_name(run, epoch)} step {done}/{s.steps_per_epoch} loss {mean_loss:.4f} '
            f'lr {lr:.2e} {s.batch * run.world / max(seconds_per_step, 1e-9):.0f} img/s elapsed '
            f'{hms(time.time() - s.start)} left ~{hms(time_left(s, steps_left, seconds_per_step))}')


def epoch_name(run, epoch):
    return f'{epoch + 1}/{run.args.epochs}' if run.args.epochs else f'{epoch + 1}'


def time_left(s, steps_left, seconds_per_step):
    """Seconds to the end of the run at this pace, or to the --time-limit if that comes first."""
    left = steps_left * max(seconds_per_step, 1e-9)
    return min(left, s.deadline - time.time()) if s.deadline else left


def hms(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------- validation, best.pt

VAL_SCORES = ('rmse', 'mae', 'r2', 'rmse_clean')  # history.csv, metrics.json: val_rmse, ...


def evaluate(run):
    """Validation scores and predictions. Process 0 evaluates (its model is the one saved in
    best.pt) and sends the scores to the others, so every process makes the same decisions.
    rmse_clean: the RMSE on the rows the old cleaning kept, to compare with earlier numbers."""
    scores, pred, rows, args = None, None, run.rows, run.args
    if run.rank == 0:
        batch = models.eval_batch(run.schedule.batch, run.device)
        pred = models.predict_ages(run.learner.evaluated(), rows.images, rows.val, args.size,
                                   models.INPUT_CHANNELS[args.model], batch, run.device,
                                   tta=args.tta, precision=run.learner.precision).numpy()
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
    """{'val_rmse': ..., ...}: the scores as the run's files name them; NaN without validation."""
    return {f'val_{key}': scores[key] if scores else math.nan for key in VAL_SCORES}


def record_epoch(run, epoch, ending, train_loss, scores):
    """Add the epoch to the history; returns whether it is the best so far (without validation,
    scores None, the latest)."""
    progress = run.progress
    improved = scores is None or scores['rmse'] < progress.best_val_rmse
    if ending is Ending.COMPLETED:
        progress.epoch += 1
    progress.step = 0
    progress.history.append({
        'epoch': epoch + 1, 'train_loss': train_loss, **val_columns(scores),
        'lr': run.learner.optimizer.param_groups[0]['lr'],
        'img_per_s': progress.train_images / max(progress.train_seconds, 1e-9),
        'seconds': time.time() - run.schedule.start})
    if improved:
        progress.best_val_rmse = scores['rmse'] if scores else math.nan
        progress.best_epoch, progress.bad_epochs = epoch + 1, 0
    else:
        progress.bad_epochs += 1
    return improved


def save_epoch(run, epoch, improved):
    """Process 0: the epoch's line, best.pt when it improved, and history.csv."""
    if run.rank != 0:
        return
    row, s = run.progress.history[-1], run.schedule
    epochs_here = len(run.progress.history) - s.epochs_before
    seconds_per_step = row['seconds'] / max(epochs_here, 1) / s.steps_per_epoch
    left = time_left(s, (s.epochs - epoch - 1) * s.steps_per_epoch, seconds_per_step)
    run.log(f'epoch {epoch_name(run, epoch)} train_loss {row["train_loss"]:.4f} val_rmse '
            f'{row["val_rmse"]:.3f} val_mae {row["val_mae"]:.3f} val_r2 {row["val_r2"]:.3f} '
            f'{row["img_per_s"]:.0f} img/s elapsed {hms(row["seconds"])} left '
            f'~{hms(left)}' + ('  *best' if improved else ''))
    if improved:
        models.save_file(os.path.join(run.out_dir, 'best.pt'),
                         {**model_fields(run), 'model': run.learner.evaluated().state_dict(),
                          'epoch': run.progress.best_epoch, 'val_rmse': run.progress.best_val_rmse})
        run.saved['best.pt'] = run.progress.best_epoch
    dataset.write_csv(pd.DataFrame(run.progress.history), os.path.join(run.out_dir, 'history.csv'))


def model_fields(run):
    """What best.pt and last.pt hold besides the weights: what predict.py rebuilds the model from,
    and the run's options."""
    return {'model_name': run.args.model, 'size': run.args.size, 'args': vars(run.args),
            'channels': models.INPUT_CHANNELS[run.args.model], 'bins': run.learner.model.bins,
            'y_mean': run.rows.age_mean, 'y_std': run.rows.age_std}


def save_last(run):
    """Process 0: last.pt, all that --resume needs (run_control.py). Returns its path."""
    path = os.path.join(run.out_dir, 'last.pt')
    if run.rank == 0:
        fields = {**model_fields(run), 'state': dataclasses.asdict(run.progress)}
        run_control.save_last(path, fields, run.learner.parts(), run.augment_rng,
                              run.device)
        run.saved['last.pt'] = run.progress.epoch
    return path


def resume_from(run, ckpt):
    """Continue from a last.pt: weights, optimizer, counters and random draws as they were."""
    learner, path = run.learner, os.path.join(run.out_dir, 'last.pt')
    state, same_draws = run_control.restore(ckpt, path, learner.parts(), run.augment_rng,
                                            run.device, run.log)
    try:
        run.progress = Progress(**state)
    except TypeError as e:  # an edited or foreign 'state'
        raise models.CheckpointError(f'{path} does not fit this run ({e})') from None
    if not same_draws and run.augment_rng is not None:
        run.augment_rng.manual_seed(augmentation_seed(run, run.progress.epoch, run.progress.step))
    run.saved = {'last.pt': run.progress.epoch, 'best.pt': run.progress.best_epoch}
    if run.progress.best_epoch < 1:  # stopped in its first epoch: no best.pt yet
        del run.saved['best.pt']
    run.log(f'resumed at epoch {run.progress.epoch + 1} step {run.progress.step} '
            f'(best val RMSE {run.progress.best_val_rmse:.3f})')


# ----------------------------------------------------------------------------- the end of a run

def finish(run, ending):
    """Score the best checkpoint once more and write the run's files: metrics.json (with the RMSE
    per age decade), val_predictions.csv and the two plots. last.pt goes. Returns the result,
    with the validation predictions under 'val_pred'."""
    p, rows = run.progress, run.rows
    result = {'val_rmse': None, 'best_epoch': p.best_epoch, 'epochs_run': len(p.history),
              'stopped': ending.value, 'seconds': time.time() - run.schedule.start,
              'train_img_per_s': p.train_images / max(p.train_seconds, 1e-9),
              'n_train': len(rows.train), 'n_val': len(rows.val), 'device': str(run.device),
              'world_size': run.world, 'model': run.args.model, 'size': run.args.size,
              'precision': run.learner.precision, 'precision_why': run.learner.precision_why}
    pred = None
    if len(rows.val):
        if run.rank == 0:
            best = models.load_checkpoint(os.path.join(run.out_dir, 'best.pt'))
            run.learner.evaluated().load_state_dict(best['model'])
        scores, pred = evaluate(run)
        result.update(val_columns(scores), n_val_clean=int(rows.val_clean.sum()))
    if run.rank == 0:
        if pred is not None:
            out = lambda name: os.path.join(run.out_dir, name)  # noqa: E731
            dataset.write_csv(pd.DataFrame({'ID': rows.val_ids, 'age': rows.val_ages,
                                            'prediction': pred}), out('val_predictions.csv'))
            result['rmse_by_decade'] = metrics.report(
                out('predictions.png'), out('error_by_decade.png'), rows.val_ages, pred,
                f'{run.args.model}, validation, best epoch {p.best_epoch}', run.log)
        dataset.write_json(result, os.path.join(run.out_dir, 'metrics.json'))
        with contextlib.suppress(FileNotFoundError):  # the run is complete: nothing to resume
            os.remove(os.path.join(run.out_dir, 'last.pt'))
    result.pop('rmse_by_decade', None)
    return {**result, 'val_pred': pred}


# ----------------------------------------------------------------------------- the command line

def load_data(args, log=print, rank=0, world=1):
    """The clean table and its decoded faces (dataset.read_table), for train.py and cv.py; --demo
    makes and cleans the synthetic data first. Under torchrun, process 0 makes the demo data and
    the image cache; the others then read them."""
    if world > 1 and rank != 0:
        dist.barrier()
    if args.demo:
        demo_data.prepare(args.data, args.csv or os.path.join(args.data, 'wiki_labels_clean.csv'),
                          log)
    table, images = dataset.read_table(args, log)
    if world > 1 and rank == 0:
        dist.barrier()
    return table, images


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_train_options(parser, RECIPE, DEMO)
    parser.add_argument('--val-frac', type=cli.number(at_least=0, at_most=0.5),
                        help='validation share, grouped by person (1/round(1/val_frac) of the '
                             'people); 0: train the final model on every row for --epochs, with no '
                             f'validation (default: {cli.per_model(RECIPE, "val_frac")})')
    parser.add_argument('--out-dir', help='run directory (default: runs/MODEL-LOSS-DATE-TIME, or '
                                          'runs/demo-DATE-TIME)')
    changeable = ", ".join("--" + o.replace("_", "-") for o in cli.HOW_TO_RUN)
    parser.add_argument('--resume', metavar='RUN_DIR',
                        help='continue the run saved in RUN_DIR/last.pt with its saved options '
                             f'(only {changeable} may change)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if cli.in_use(args.resume or args.out_dir):  # two terminals, or an SSH command sent twice
        return 1
    resume = None
    if args.resume:
        args, resume = cli.resumed_options(parser, args, build_parser())
        if resume is None:
            return 1
    else:
        name = 'demo' if args.demo else f'{args.model}-{args.loss}'
        args.out_dir = args.out_dir or f'runs/{name}-{time.strftime("%Y%m%d-%H%M%S")}'
        if cli.holds_a_run(args.out_dir):
            parser.error(f'--out-dir {args.out_dir} already holds a run; '
                         + cli.how_to_go_on(args.out_dir))
    return cli.run(lambda: train_command(args, resume), batch_size=args.batch_size)


def train_command(args, resume):
    with models.distributed(args.device) as (rank, world, device), models.cpu_threads(args.threads):
        if world > 1:  # the ranks may have stamped their default --out-dir a second apart
            out_dir = [args.out_dir]
            dist.broadcast_object_list(out_dir, src=0)
            args.out_dir = out_dir[0]
        log = cli.log_on(rank)
        table, images = load_data(args, log, rank, world)
        train_rows, val_rows = clean_data.split(args, table)
        # made and claimed only now that the inputs are checked
        with cli.output_folder(args.out_dir, claim=rank == 0):
            images = dataset.place_images(images, device, log)
            rows = clean_data.make_rows(args, images, table, train_rows, val_rows)
            try:
                result = fit(args, rows, args.out_dir, device, resume, log, rank, world)
            except SystemExit:  # a signal: last.pt is saved
                log(f'continue with: python train.py --resume {args.out_dir}')
                raise
            except dataset.WriteError as e:  # a full disk: what to do once there is space
                raise dataset.WriteError(f'{e}; once there is space, '
                                         + cli.how_to_go_on(args.out_dir)) from None
    speed = f'{result["train_img_per_s"]:.0f} img/s, {hms(result["seconds"])}'
    if result['val_rmse'] is None:
        log(f'done: trained on all {result["n_train"]} rows for {result["epochs_run"]} epochs, '
            f'no validation ({speed}); run saved in {args.out_dir}')
    else:
        log(f'done: val RMSE {result["val_rmse"]:.3f}  MAE {result["val_mae"]:.3f}  R^2 '
            f'{result["val_r2"]:.3f} on {result["n_val"]} test-like rows (best epoch '
            f'{result["best_epoch"]}, {speed}); run saved in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
