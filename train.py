"""Train one age regressor on a person-grouped train/validation split.

    python train.py --demo                                   # synthetic faces, CPU, 1-2 minutes
    python clean_data.py --data data/wiki                    # once, for the real data
    python train.py --data data/wiki --model resnet50 --loss smoothl1 --out-dir runs/r50
    python train.py --data data/wiki --model cnn --weights none --device cpu --time-limit 10
    python train.py --resume runs/r50                        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data data/wiki    # one run on 4 GPUs (DDP)

The recipe is `fit`, just below: build the model and AdamW, then each epoch `train_epoch`
(augmented batches; the learning rate warms up, then decays to zero at the last step, or at
--time-limit), `evaluate` on the validation rows and keep the best checkpoint; at the end `finish`
scores the best checkpoint once more and writes the run's files. Its parts follow in the order fit
calls them; the command line is at the end.

The run directory gets best.pt (everything predict.py needs), history.csv, metrics.json,
val_predictions.csv, predictions.png (predicted against true age) and error_by_decade.png.
Ctrl-C or SIGTERM saves last.pt, from which --resume continues exactly where the run stopped.
"""
import argparse
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

import clean_data
import cli
import dataset
import metrics
import models
import predict


class Diverged(dataset.UserError):
    """The loss or the validation error stopped being a finite number."""


# ----------------------------------------------------------------------------- the recipe

def fit(args, images, table, train_rows, val_rows, out_dir, device, rank=0, world=1, resume=None, log=print):
    """Train on images[train_rows], validate on images[val_rows] every epoch, keep the best.

    images: uint8 tensor (N, 100, 100), on `device` when it fits, else on the CPU; table: the
    clean table of the same N rows. Returns a dict of final metrics. Raises Diverged on a NaN/inf
    loss, SystemExit after a signal (with last.pt saved)."""
    run = start_run(args, images, table, train_rows, val_rows, out_dir, device, rank, world, log)
    if resume is not None:
        restore(run, resume)
    run.schedule.begin(args.time_limit, epochs_before=len(run.progress.history))
    log_start(run)
    stopped = 'completed'
    with cli.Stop.catching():
        while run.progress.epoch < (args.epochs or math.inf) and stopped == 'completed':
            epoch = run.progress.epoch
            train_loss, img_per_s, stopped = train_epoch(run, epoch)
            if stopped == 'signal':
                save_last_and_exit(run, epoch)
            scores = evaluate(run)[0] if len(run.rows.val) else None  # None: --val-frac 0, nothing to choose by
            improved = record_epoch(run.progress, epoch, stopped, train_loss, img_per_s, scores,
                                    lr=run.learner.optimizer.param_groups[0]['lr'], seconds=run.schedule.elapsed())
            if rank == 0:
                log_epoch(run, epoch, improved)
                if improved:
                    models.save_file(os.path.join(out_dir, 'best.pt'), checkpoint(run, 'best'))
                dataset.write_csv(pd.DataFrame(run.progress.history), os.path.join(out_dir, 'history.csv'))
                if stopped == 'completed' and run.progress.epoch < (args.epochs or math.inf):
                    models.save_file(os.path.join(out_dir, 'last.pt'), checkpoint(run, 'last'))
            if stopped == 'completed' and args.patience and run.progress.bad_epochs >= args.patience:
                stopped = 'early_stop'
                log(f'early stop: no better val RMSE for {args.patience} epochs')
    if stopped == 'time_limit':
        log(f'time limit of {args.time_limit:g} min reached')
    return finish(run, stopped)


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
    val_clean: np.ndarray        # which validation rows the old cleaning kept: scored apart too
    draw_weights: torch.Tensor   # --balance-gender: each training row's weight in the draws, else None
    age_mean: float              # of the training rows: the model learns (age - age_mean) / age_std
    age_std: float


@dataclasses.dataclass
class Learner:
    """The model and what trains it."""
    model: nn.Module             # saved, evaluated and restored
    step_model: nn.Module        # what the training step calls: `model` wrapped for DDP or torch.compile
    ema: nn.Module               # --ema: the moving average of the weights (validated and saved), else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    aug: torch.Generator         # the augmentation draws; None with --no-augment

    def evaluated(self):
        """The model that is validated and saved in best.pt: the moving average with --ema."""
        return self.ema.module if self.ema is not None else self.model


@dataclasses.dataclass
class Schedule:
    """Steps, and the clock of a time limit: what the learning rate follows."""
    batch: int                   # images per step in each process
    steps_per_epoch: int
    total_steps: int             # epochs x steps_per_epoch, where the learning rate reaches zero; None: at the deadline
    warmup_steps: int
    start: float = None          # time.time() when this session's training started
    deadline: float = None       # time.time() at --time-limit, else None
    epochs_before: int = 0       # epochs done before this session (resumed): its own pace sets "left"

    def begin(self, time_limit, epochs_before):
        self.start, self.epochs_before = time.time(), epochs_before
        self.deadline = self.start + time_limit * 60 if time_limit else None

    def elapsed(self):
        return time.time() - self.start

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
    history: list = dataclasses.field(default_factory=list)  # one row per epoch: history.csv
    loss_sum: float = 0.0        # the current epoch's training loss so far
    loss_count: int = 0
    train_images: int = 0
    train_seconds: float = 0.0


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    rows: Rows
    learner: Learner
    schedule: Schedule
    progress: Progress
    out_dir: str
    device: torch.device
    rank: int                    # this process, of `world` (torchrun); 0 of 1 otherwise
    world: int
    log: callable


def start_run(args, images, table, train_rows, val_rows, out_dir, device, rank, world, log):
    rows = make_rows(args, images, table, train_rows, val_rows)
    learner = build_learner(args, rows.age_mean, rows.age_std, device, world, log)
    batch = max(1, args.batch_size // world)
    steps_per_epoch = max(1, len(rows.train) // world // batch)
    total = args.epochs * steps_per_epoch if args.epochs else None  # None: --time-limit alone ends the run
    schedule = Schedule(batch=batch, steps_per_epoch=steps_per_epoch, total_steps=total,
                        warmup_steps=warmup_steps(total, steps_per_epoch) if total else None)
    return Run(args=args, rows=rows, learner=learner, schedule=schedule, progress=Progress(), out_dir=out_dir,
               device=device, rank=rank, world=world, log=log)


def make_rows(args, images, table, train_rows, val_rows):
    ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
    train_rows = torch.as_tensor(train_rows)
    train_ages = ages[train_rows.to(ages.device)]
    val_rows = np.asarray(val_rows, dtype=np.int64)
    return Rows(images=images, ages=ages, train=train_rows, val=val_rows,
                val_ages=table['age'].to_numpy()[val_rows], val_ids=table['ID'].to_numpy()[val_rows],
                val_clean=clean_data.clean_only(table.iloc[val_rows]),
                draw_weights=clean_data.draw_weights(table['gender'].to_numpy()[train_rows.numpy()]) if args.balance_gender
                else None, age_mean=float(train_ages.mean()),
                age_std=float(train_ages.std()) if len(train_rows) > 1 else 1.0)


def build_learner(args, age_mean, age_std, device, world=1, log=print):
    torch.manual_seed(args.seed)  # the initial weights, and later dropout, draw from the global generator
    bins = models.AGE_BINS if args.loss == 'dex' else 0
    model = models.place(models.build_model(args.model, args.weights, age_mean, max(age_std, 1e-3), bins), device)
    step_model = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                         else None)
    if args.compile:
        step_model = models.compile_model(step_model, args.compile, device, log)
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
    optimizer, scaler = build_optimizer(model, args, device)
    return Learner(model=model, step_model=step_model, ema=ema, optimizer=optimizer, scaler=scaler,
                   criterion=models.make_criterion(args.loss, age_mean, age_std),
                   aug=None if args.no_augment else torch.Generator(device=device))


def build_optimizer(model, args, device):
    """AdamW (its fused kernel on CUDA and on the CPU: RESULTS.md, Speed) and the loss scaler, which
    only fp16 needs. Four parameter groups: the head and the backbone, each split into conv/linear
    weights, which decay, and norm-layer weights and biases, which do not (decaying those only
    shrinks what normalisation sets, as nanoGPT's optimizer set-up notes)."""
    head = {id(p) for m in model.modules() if isinstance(m, models.FP32Linear) for p in m.parameters()}
    grouped = {}
    for p in model.parameters():
        grouped.setdefault((id(p) in head, p.dim() >= 2), []).append(p)
    groups = [{'params': params, 'lr': args.lr if is_head else backbone_lr(args), 'initial_lr':
               args.lr if is_head else backbone_lr(args), 'weight_decay': args.weight_decay if decays else 0.0}
              for (is_head, decays), params in grouped.items()]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler('cuda', enabled=models.half_dtype(device) == torch.float16)
    return optimizer, scaler


def backbone_lr(args):
    """A pretrained backbone learns 10x slower than the new head (fine-tuning, as the CVPR 2024
    age benchmark does: 1e-4 against 1e-3 from scratch); from scratch all layers share --lr."""
    if args.backbone_lr:
        return args.backbone_lr
    return args.lr / 10 if args.weights not in (None, 'none') else args.lr


def warmup_steps(total_steps, steps_per_epoch):
    """A tenth of the run, at most three epochs."""
    return min(total_steps // 10, 3 * steps_per_epoch)


def log_start(run):
    args, s = run.args, run.schedule
    lr = f'{args.lr:g}' + (f' (head), {backbone_lr(args):g} (pretrained backbone)' if backbone_lr(args) != args.lr else '')
    run.log(f'training {args.model} on {len(run.rows.train)} images, validating on {len(run.rows.val)} '
            f'({s.steps_per_epoch} steps/epoch x '
            f'{f"{args.epochs} epochs" if args.epochs else f"epochs until the {args.time_limit:g}-minute limit"}, '
            f'batch {s.batch * run.world}, device {run.device}'
            f'{f", {run.world} processes" if run.world > 1 else ""}); peak learning rate {lr}, loss {args.loss}'
            f'{f", EMA {args.ema:g}" if args.ema else ""}, validation TTA {"off" if args.no_tta else "on"}')


# ----------------------------------------------------------------------------- one epoch

def train_epoch(run, epoch):
    """One epoch of training, from run.progress.step (not 0 when resumed mid-epoch). Returns (mean
    training loss, images/s, why it stopped: 'completed', 'time_limit' or 'signal')."""
    args, rows, learner, s, progress = run.args, run.rows, run.learner, run.schedule, run.progress
    order = clean_data.epoch_order(len(rows.train), rows.draw_weights, args.seed, epoch)
    order = rows.train[order[run.rank::run.world]].to(rows.images.device)  # indices live with the images
    if progress.step == 0:  # a fresh epoch, not one resumed mid-way
        if learner.aug is not None:
            learner.aug.manual_seed(args.seed * 1_000_003 + epoch * 101 + run.rank)
        progress.loss_sum, progress.loss_count = 0.0, 0
    learner.step_model.train()
    first = done = checked = progress.step
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no GPU sync per step
    t0 = tick = time.time()
    stopped, total = 'completed', 0.0
    for step in range(first, s.steps_per_epoch):
        idx = order[step * s.batch:(step + 1) * s.batch]
        x = dataset.to_model_input(rows.images.index_select(0, idx).to(run.device, non_blocking=True), args.size,
                                   models.INPUT_CHANNELS[args.model], generator=learner.aug)
        y = (rows.ages[idx.to(rows.ages.device)].to(run.device, non_blocking=True) - rows.age_mean) / rows.age_std
        factor = lr_factor(epoch * s.steps_per_epoch + step, s.total_steps, s.warmup_steps, s.time_fraction())
        for group in learner.optimizer.param_groups:
            group['lr'] = group['initial_lr'] * factor
        loss_sum += train_step(learner, x, y)
        done = step + 1
        log_step = done % args.log_every == 0 or done == s.steps_per_epoch
        if log_step:
            total = loss_over_processes(run, loss_sum, epoch, checked + 1, done)
            log_steps(run, epoch, done, done - checked, time.time() - tick,
                      (progress.loss_sum + total) / (progress.loss_count + done - first))
            tick, checked = time.time(), done
        if run.world == 1 or log_step:  # with several processes, agree on stopping at log steps only
            stopped = why_stop(run)
        if stopped != 'completed':
            break
    if done > checked:  # the steps since the last log step (at a log step, `total` is up to date)
        total = loss_over_processes(run, loss_sum, epoch, checked + 1, done)
    progress.step = done  # fold this session's part of the epoch into what last.pt and the history keep
    progress.loss_sum, progress.loss_count = progress.loss_sum + total, progress.loss_count + done - first
    progress.train_images += (done - first) * s.batch * run.world
    progress.train_seconds += time.time() - t0
    return progress.loss_sum / max(progress.loss_count, 1), progress.train_images / max(progress.train_seconds, 1e-9), stopped


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
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def train_step(learner, x, y):
    """Forward, loss, backward, optimizer step. Returns the loss as a tensor (no GPU sync)."""
    with models.autocast(x.device):
        out = learner.step_model(x)
    loss = learner.criterion(out.float(), y)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return loss.detach()


def loss_over_processes(run, loss_sum, epoch, from_step, to_step):
    """The summed training loss since the last check, averaged over the processes, as a number (a
    GPU sync: called at log steps only). A NaN/inf stops the run, naming the epoch and the steps."""
    if run.world > 1:
        loss_sum = loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    total = float(loss_sum)
    if not math.isfinite(total):
        where = f'step {to_step}' if from_step == to_step else f'steps {from_step}-{to_step}'
        best = os.path.join(run.out_dir, 'best.pt')
        kept = f'the best checkpoint so far is kept in {best}' if os.path.exists(best) else 'no checkpoint was saved'
        raise Diverged(f'the loss became NaN/inf at epoch {epoch + 1} {where}; stopping ({kept}). Try a lower --lr')
    return total


def log_steps(run, epoch, done, steps, seconds, mean_loss):
    """The line of a log step: the epoch's mean loss so far, images/s since the last such line, and
    the time left."""
    args, s = run.args, run.schedule
    speed = steps * s.batch * run.world / max(seconds, 1e-9)
    left = (((args.epochs or math.inf) - epoch) * s.steps_per_epoch - done) * s.batch * run.world / max(speed, 1e-9)
    run.log(f'epoch {epoch + 1}{f"/{args.epochs}" if args.epochs else ""} step {done}/{s.steps_per_epoch} loss {mean_loss:.4f} '
            f'lr {run.learner.optimizer.param_groups[0]["lr"]:.2e} {speed:.0f} img/s elapsed {cli.fmt_time(s.elapsed())} '
            f'left ~{cli.fmt_time(min(left, s.deadline - time.time()) if s.deadline else left)}')


def why_stop(run):
    """'signal' after Ctrl-C or SIGTERM, 'time_limit' past --time-limit, else 'completed'. With
    several processes, all stop at the same step: a reason on any process counts on all."""
    for reason, flag in (('signal', cli.Stop.signal is not None),
                         ('time_limit', bool(run.schedule.deadline) and time.time() > run.schedule.deadline)):
        if run.world > 1:
            t = torch.tensor([float(flag)], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            return reason
    return 'completed'


# ----------------------------------------------------------------------------- validation

def evaluate(run):
    """Validation scores and predictions. Process 0 evaluates (its model is the one saved in
    best.pt) and sends the scores to the others, so every process makes the same decisions."""
    scores, pred = None, None
    rows = run.rows
    if run.rank == 0:
        pred = predict.predict_ages(run.learner.evaluated(), rows.images, rows.val, run.args.size,
                                    models.INPUT_CHANNELS[run.args.model],
                                    predict.eval_batch(run.schedule.batch, run.device), run.device,
                                    tta=not run.args.no_tta).numpy()
        scores = metrics.scores(rows.val_ages, pred)
        clean = rows.val_clean
        scores['rmse_clean'] = metrics.scores(rows.val_ages[clean], pred[clean])['rmse'] if clean.any() else math.nan
    if run.world > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    if not math.isfinite(scores['rmse']):
        raise Diverged(f'the validation RMSE is not finite after epoch {run.progress.epoch + 1}; '
                       'stopping (try a lower --lr)')
    return scores, pred


def record_epoch(progress, epoch, stopped, train_loss, img_per_s, scores, lr, seconds):
    """Add the epoch to the history; returns whether it is the best so far. Without validation
    (scores None) there is nothing to choose by, and the latest model is the one kept."""
    improved = scores is None or scores['rmse'] < progress.best_val_rmse
    scores = scores or {'rmse': math.nan, 'mae': math.nan, 'r2': math.nan, 'rmse_clean': math.nan}
    if stopped == 'completed':
        progress.epoch += 1
    progress.step = 0
    progress.history.append({'epoch': epoch + 1, 'train_loss': train_loss, 'val_rmse': scores['rmse'],
                             'val_mae': scores['mae'], 'val_r2': scores['r2'], 'val_rmse_clean': scores['rmse_clean'],
                             'lr': lr, 'img_per_s': img_per_s, 'seconds': seconds})
    if improved:
        progress.best_val_rmse, progress.best_epoch, progress.bad_epochs = scores['rmse'], epoch + 1, 0
    else:
        progress.bad_epochs += 1
    return improved


def log_epoch(run, epoch, improved):
    row, args = run.progress.history[-1], run.args
    epochs_here = len(run.progress.history) - run.schedule.epochs_before
    left = ((args.epochs or math.inf) - epoch - 1) * (row['seconds'] / max(epochs_here, 1))
    if run.schedule.deadline:
        left = min(left, run.schedule.deadline - time.time())
    run.log(f'epoch {epoch + 1}{f"/{args.epochs}" if args.epochs else ""} train_loss {row["train_loss"]:.4f} '
            f'val_rmse {row["val_rmse"]:.3f} '
            f'val_mae {row["val_mae"]:.3f} val_r2 {row["val_r2"]:.3f} (clean rows {row["val_rmse_clean"]:.3f}) '
            f'{row["img_per_s"]:.0f} img/s elapsed {cli.fmt_time(row["seconds"])} left ~{cli.fmt_time(left)}'
            f'{"  *best" if improved else ""}')


# ----------------------------------------------------------------------------- checkpoints

def checkpoint(run, kind):
    """best.pt: the model and what predict.py needs to rebuild it. last.pt: also everything that
    --resume needs to continue exactly (optimizer, schedule, counters, random generators)."""
    args, learner = run.args, run.learner
    ckpt = {'model_name': args.model, 'size': args.size, 'channels': models.INPUT_CHANNELS[args.model],
            'bins': models.AGE_BINS if args.loss == 'dex' else 0, 'args': vars(args), 'y_mean': run.rows.age_mean,
            'y_std': run.rows.age_std}
    if kind == 'best':
        return {**ckpt, 'model': learner.evaluated().state_dict(), 'epoch': run.progress.best_epoch,
                'val_rmse': run.progress.best_val_rmse}
    return {**ckpt, 'model': learner.model.state_dict(), 'optimizer': learner.optimizer.state_dict(),
            'ema': learner.ema.state_dict() if learner.ema is not None else None,
            'scaler': learner.scaler.state_dict(), 'state': dataclasses.asdict(run.progress),
            'device_type': run.device.type, 'torch_rng': torch.get_rng_state(),
            'aug_rng': learner.aug.get_state() if learner.aug is not None else None,
            'cuda_rng': torch.cuda.get_rng_state(run.device) if run.device.type == 'cuda' else None}


def save_last_and_exit(run, epoch):
    """After Ctrl-C or SIGTERM: last.pt (process 0), then exit with the signal's code."""
    if run.rank == 0:
        path = os.path.join(run.out_dir, 'last.pt')
        models.save_file(path, checkpoint(run, 'last'))
        run.log(f'saved {path} at epoch {epoch + 1} step {run.progress.step}; '
                f'continue with: python train.py --resume {run.out_dir}')
    raise SystemExit(128 + (cli.Stop.signal or signal.SIGINT))  # another process may have had the signal


def restore(run, resume):
    """Continue from a last.pt. The device may differ from the one that saved it: tensors are
    loaded on the CPU and moved, but a random generator's state only fits a generator of the same
    kind of device (a CUDA one is 16 bytes, a CPU one 5,056), so then the draws are seeded afresh."""
    learner = run.learner
    try:
        learner.model.load_state_dict(resume['model'])
        learner.optimizer.load_state_dict(resume['optimizer'])
        if learner.ema is not None:
            learner.ema.load_state_dict(resume['ema'])
        if resume['scaler']:  # empty when saved by a disabled scaler (CPU, bf16)
            learner.scaler.load_state_dict(resume['scaler'])
        run.progress = Progress(**resume['state'])
        torch.set_rng_state(resume['torch_rng'])  # dropout draws from the global generator on CPUs
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise models.CheckpointError(f'{run.out_dir}/last.pt does not fit this run ({type(e).__name__}: '
                                     f'{str(e).splitlines()[0][:200]})') from None
    try:
        if learner.aug is not None:
            learner.aug.set_state(resume['aug_rng'])
        if run.device.type == 'cuda':
            torch.cuda.set_rng_state(resume['cuda_rng'], run.device)
    except (RuntimeError, TypeError):  # saved on another kind of device: its generator states do not fit
        p = run.progress
        if learner.aug is not None:
            learner.aug.manual_seed(run.args.seed * 1_000_003 + p.epoch * 101 + p.step * 7 + run.rank)
        run.log(f'warning: last.pt was saved on {resume.get("device_type", "another device")}, this run goes on on '
                f'{run.device.type}: the same weights, optimizer and schedule, but other random draws '
                '(augmentation, dropout) than an uninterrupted run')
    run.log(f'resumed at epoch {run.progress.epoch + 1} step {run.progress.step} '
            f'(best val RMSE {run.progress.best_val_rmse:.3f})')


# ----------------------------------------------------------------------------- the end of a run

def finish(run, stopped):
    """Score the best checkpoint once more and write the run's files: metrics.json (with the RMSE
    per age decade), val_predictions.csv, predictions.png, error_by_decade.png, and a warning when
    the predictions collapsed towards one age. last.pt goes. Returns the result, with the
    validation predictions under 'val_pred'."""
    p, rows = run.progress, run.rows
    result = {'val_rmse': None, 'best_epoch': p.best_epoch, 'epochs_run': len(p.history), 'stopped': stopped,
              'train_img_per_s': p.train_images / max(p.train_seconds, 1e-9), 'seconds': run.schedule.elapsed(),
              'n_train': len(rows.train), 'n_val': len(rows.val), 'device': str(run.device), 'world_size': run.world,
              'model': run.args.model, 'size': run.args.size}
    pred = None
    if len(rows.val):
        if run.rank == 0:
            best = models.load_checkpoint(os.path.join(run.out_dir, 'best.pt'))
            run.learner.evaluated().load_state_dict(best['model'])
        scores, pred = evaluate(run)
        result.update(val_rmse=scores['rmse'], val_mae=scores['mae'], val_r2=scores['r2'],
                      val_rmse_clean=scores['rmse_clean'], n_val_clean=int(rows.val_clean.sum()))
    if run.rank == 0:
        by_decade = {}
        if pred is not None:
            dataset.write_csv(pd.DataFrame({'ID': rows.val_ids, 'age': rows.val_ages, 'prediction': pred}),
                              os.path.join(run.out_dir, 'val_predictions.csv'))
            metrics.plot_both(os.path.join(run.out_dir, 'predictions.png'),
                              os.path.join(run.out_dir, 'error_by_decade.png'), rows.val_ages, pred,
                              f'{run.args.model}, validation, best epoch {p.best_epoch}')
            by_decade = {'rmse_by_decade': metrics.rmse_by_decade(rows.val_ages, pred)}
            warning = metrics.collapse_warning(rows.val_ages, pred)
            if warning:
                run.log(warning)
        dataset.write_json({**result, **by_decade}, os.path.join(run.out_dir, 'metrics.json'))
        last = os.path.join(run.out_dir, 'last.pt')
        if os.path.exists(last):  # the run is complete: nothing to resume
            os.remove(last)
    return {**result, 'val_pred': pred}


# ----------------------------------------------------------------------------- the command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_train_options(parser)
    parser.add_argument('--val-frac', type=cli.number(at_least=0, at_most=0.5), default=0.2,
                        help='validation share, grouped by person (1/round(1/val_frac) of the people); 0: train '
                             'the final model on every row for --epochs, with no validation')
    parser.add_argument('--out-dir', help='run directory (default: runs/MODEL-LOSS-DATE-TIME, or runs/demo-DATE-TIME)')
    parser.add_argument('--resume', metavar='RUN_DIR',
                        help='continue the run saved in RUN_DIR/last.pt with its saved options '
                             '(only --device, --time-limit and --log-every may change)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    resume = None
    if args.resume:
        last = os.path.join(args.resume, 'last.pt')
        if not os.path.exists(last):
            done = os.path.exists(os.path.join(args.resume, 'metrics.json'))
            parser.error(f'--resume {args.resume}: ' + ('the run finished (metrics.json is there)' if done
                                                        else 'no last.pt to resume from'))
        try:  # the saved options, except those that may change between sessions
            resume = models.load_checkpoint(last, resumable=True)
            changeable = {k: getattr(args, k) for k in ('device', 'time_limit', 'log_every')}
            args = argparse.Namespace(**{**vars(cli.parse_saved(build_parser(), {**resume['args'], **changeable}, last)),
                                         'demo': bool(resume['args'].get('demo')), 'resume': args.resume,
                                         'out_dir': args.resume})
        except models.CheckpointError as e:
            cli.error(f'--resume {args.resume}: {last} cannot be resumed from ({e})')
            return 1
    else:
        name = 'demo' if args.demo else f'{args.model}-{args.loss}'
        args.out_dir = args.out_dir or os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
        if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
            parser.error(f'--out-dir {args.out_dir} already holds a run; choose a new --out-dir, '
                         f'or continue it with --resume {args.out_dir}')
    return cli.run(lambda: train_command(args, resume), batch_size=args.batch_size)


def train_command(args, resume):
    with models.distributed(args.device) as (rank, world, device):
        if world > 1:  # the ranks may have stamped their default --out-dir a second apart: use rank 0's
            out_dir = [args.out_dir]
            dist.broadcast_object_list(out_dir, src=0)
            args.out_dir = out_dir[0]
        log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its kernels once
        table, images = clean_data.load_table(args, log, rank, world)
        train_rows, val_rows = clean_data.split(args, table)
        with cli.output_folder(args.out_dir):  # made only now that the inputs are checked
            images = dataset.place_images(images, device, log)
            result = fit(args, images, table, train_rows, val_rows, args.out_dir, device, rank, world, resume, log)
    if result['val_rmse'] is None:
        log(f'done: trained on all {result["n_train"]} rows for {result["epochs_run"]} epochs, no validation '
            f'({result["train_img_per_s"]:.0f} img/s, {cli.fmt_time(result["seconds"])}); run saved in {args.out_dir}')
    else:
        log(f'done: val RMSE {result["val_rmse"]:.3f}  MAE {result["val_mae"]:.3f}  R^2 {result["val_r2"]:.3f} '
            f'on {result["n_val"]} test-like rows; RMSE {result["val_rmse_clean"]:.3f} on the {result["n_val_clean"]} '
            f'clean ones (best epoch {result["best_epoch"]}, {result["train_img_per_s"]:.0f} img/s, '
            f'{cli.fmt_time(result["seconds"])}); run saved in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
