"""Run control: what train.py's loop leaves out of sight, so that `fit` reads as a textbook loop.

Progress lines with images/s and the time left; the training loss read (a GPU sync) only at
progress lines and checked for NaN; stopping cleanly on Ctrl-C, SIGTERM or --time-limit, with
every torchrun process stopping at the same step; best.pt after a better epoch, history.csv after
each, last.pt for --resume, which continues exactly where a run stopped (mid-epoch included).
"""
import contextlib
import dataclasses
import enum
import math
import os
import signal
import time

import pandas as pd
import torch
import torch.distributed as dist

import dataset
import models


class Ending(enum.Enum):
    """Why an epoch, and so a run, ended: metrics.json's 'stopped'."""
    COMPLETED = 'completed'
    TIME_LIMIT = 'time_limit'
    SIGNAL = 'signal'
    EARLY_STOP = 'early_stop'


class Diverged(dataset.UserError):
    """The loss or the validation error stopped being a finite number."""


@dataclasses.dataclass
class Progress:
    """Where training stands: what last.pt saves and --resume restores."""
    epoch: int = 0               # epochs completed
    step: int = 0                # steps done in the current epoch (not 0 after a stop mid-epoch)
    best_val_rmse: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0          # epochs since the best one
    history: list = dataclasses.field(default_factory=list)  # a row per epoch: history.csv
    loss_sum: float = 0.0        # the current epoch's training loss so far
    loss_count: int = 0
    train_images: int = 0
    train_seconds: float = 0.0


@dataclasses.dataclass
class EpochClock:
    """An epoch in progress: its first step (not 0 when resumed), the loss summed on the device
    (no GPU sync per step), and the last step whose loss was read and logged."""
    first: int
    checked: int
    loss_sum: torch.Tensor
    loss_read: float = 0.0       # loss_sum as of step `checked`
    start: float = 0.0
    tick: float = 0.0            # time.time() at the last progress line


def start_epoch(run, epoch):
    """The clock of an epoch; a fresh one (not resumed mid-way) also reseeds the augmentation."""
    progress = run.progress
    if progress.step == 0:  # a fresh epoch, not one resumed mid-way
        if run.learner.aug is not None:
            run.learner.aug.manual_seed(augmentation_seed(run, epoch, 0))
        progress.loss_sum, progress.loss_count = 0.0, 0
    now = time.time()
    return EpochClock(first=progress.step, checked=progress.step,
                      loss_sum=torch.zeros((), device=run.device), start=now, tick=now)


def augmentation_seed(run, epoch, step):
    """The augmentation draws from (seed, epoch, step, rank): a fresh epoch starts at step 0."""
    return run.args.seed * 1_000_003 + epoch * 101 + step * 7 + run.rank


def after_step(run, clock, epoch, done, loss):
    """After `done` steps of the epoch: a progress line every --log-every steps (reading the loss,
    a GPU sync), and whether to stop here."""
    clock.loss_sum += loss
    run.progress.step = done
    log_step = done % run.args.log_every == 0 or done == run.schedule.steps_per_epoch
    if log_step:
        read_loss(run, clock, epoch, done)
        log_steps(run, clock, epoch, done)
    if run.world == 1 or log_step:  # several processes agree on stopping at log steps only
        return why_stop(run)
    return Ending.COMPLETED


def read_loss(run, clock, epoch, done):
    """The loss summed since the epoch's first step, averaged over the processes. A NaN/inf stops
    the run, naming the epoch and the steps since the last check."""
    loss_sum = clock.loss_sum
    if run.world > 1:
        loss_sum = loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    total = float(loss_sum)
    if not math.isfinite(total):
        where = f'step {done}' if clock.checked + 1 == done else f'steps {clock.checked + 1}-{done}'
        best = os.path.join(run.out_dir, 'best.pt')
        kept = f'the best checkpoint so far is kept in {best}' if os.path.exists(best) else \
            'no checkpoint was saved'
        raise Diverged(f'the loss became NaN/inf at epoch {epoch + 1} {where}; stopping ({kept}). '
                       'Try a lower --lr')
    clock.loss_read = total


def end_epoch(run, clock, epoch):
    """Fold this session's part of the epoch into what last.pt and the history keep; returns the
    epoch's mean training loss."""
    progress, done = run.progress, run.progress.step
    if done > clock.checked:  # the steps since the last progress line
        read_loss(run, clock, epoch, done)
    progress.loss_sum += clock.loss_read
    progress.loss_count += done - clock.first
    progress.train_images += (done - clock.first) * run.schedule.batch * run.world
    progress.train_seconds += time.time() - clock.start
    return progress.loss_sum / max(progress.loss_count, 1)


def why_stop(run):
    """SIGNAL after Ctrl-C or SIGTERM, TIME_LIMIT past --time-limit, else COMPLETED. With several
    processes, all stop at the same step: a reason on any process counts on all."""
    deadline = run.schedule.deadline
    for ending, flag in ((Ending.SIGNAL, Signals.caught is not None),
                         (Ending.TIME_LIMIT, bool(deadline) and time.time() > deadline)):
        if run.world > 1:
            t = torch.tensor([float(flag)], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            return ending
    return Ending.COMPLETED


class Signals:
    """While training, Ctrl-C / SIGTERM set `caught` and the loop saves a resumable checkpoint at
    the end of the step; a second Ctrl-C gives up at once. Outside training they act as usual."""
    caught = None

    @classmethod
    @contextlib.contextmanager
    def catching(cls):
        def handler(signum, frame):
            if cls.caught is not None:
                raise KeyboardInterrupt
            cls.caught = signum
            print(f'\n{signal.Signals(signum).name}: stopping after this step, saving last.pt ...',
                  flush=True)
        cls.caught = None
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def log_steps(run, clock, epoch, done):
    """The progress line: the epoch's mean loss so far, images/s since the last line, time left."""
    s, progress = run.schedule, run.progress
    seconds_per_step = (time.time() - clock.tick) / (done - clock.checked)
    mean_loss = (progress.loss_sum + clock.loss_read) / (progress.loss_count + done - clock.first)
    steps_left = (s.epochs - epoch) * s.steps_per_epoch - done
    lr = run.learner.optimizer.param_groups[0]['lr']
    run.log(f'epoch {epoch_name(run, epoch)} step {done}/{s.steps_per_epoch} loss {mean_loss:.4f} '
            f'lr {lr:.2e} {s.batch * run.world / max(seconds_per_step, 1e-9):.0f} img/s elapsed '
            f'{fmt_time(s.elapsed())} left '
            f'~{fmt_time(time_left(run, steps_left, seconds_per_step))}')
    clock.tick, clock.checked = time.time(), done


def epoch_name(run, epoch):
    return f'{epoch + 1}/{run.args.epochs}' if run.args.epochs else f'{epoch + 1}'


def time_left(run, steps_left, seconds_per_step):
    """Seconds to the end of the run at this pace, or to the --time-limit if that comes first."""
    left = steps_left * max(seconds_per_step, 1e-9)
    return min(left, run.schedule.deadline - time.time()) if run.schedule.deadline else left


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def save_epoch(run, epoch, improved, ending):
    """Process 0: the epoch's line, best.pt when it improved, history.csv, and last.pt unless the
    run ends here."""
    if run.rank != 0:
        return
    row, s = run.progress.history[-1], run.schedule
    epochs_here = len(run.progress.history) - s.epochs_before
    seconds_per_step = row['seconds'] / max(epochs_here, 1) / s.steps_per_epoch
    left = time_left(run, (s.epochs - epoch - 1) * s.steps_per_epoch, seconds_per_step)
    run.log(f'epoch {epoch_name(run, epoch)} train_loss {row["train_loss"]:.4f} val_rmse '
            f'{row["val_rmse"]:.3f} val_mae {row["val_mae"]:.3f} val_r2 {row["val_r2"]:.3f} '
            f'{row["img_per_s"]:.0f} img/s elapsed {fmt_time(row["seconds"])} left '
            f'~{fmt_time(left)}'
            + ('  *best' if improved else ''))
    if improved:
        models.save_file(os.path.join(run.out_dir, 'best.pt'), checkpoint(run, 'best'))
    dataset.write_csv(pd.DataFrame(run.progress.history), os.path.join(run.out_dir, 'history.csv'))
    if ending is Ending.COMPLETED and run.progress.epoch < s.epochs:
        models.save_file(os.path.join(run.out_dir, 'last.pt'), checkpoint(run, 'last'))


def checkpoint(run, kind):
    """best.pt: the model and what predict.py needs to rebuild it. last.pt: also everything that
    --resume needs to continue exactly (optimizer, schedule, counters, random generators)."""
    args, learner = run.args, run.learner
    ckpt = {'model_name': args.model, 'size': args.size,
            'channels': models.INPUT_CHANNELS[args.model],
            'bins': learner.model.bins, 'args': vars(args), 'y_mean': run.rows.age_mean,
            'y_std': run.rows.age_std}
    if kind == 'best':
        return {**ckpt, 'model': learner.evaluated().state_dict(), 'epoch': run.progress.best_epoch,
                'val_rmse': run.progress.best_val_rmse}
    on_cuda = run.device.type == 'cuda'
    return {**ckpt, 'model': learner.model.state_dict(),
            'optimizer': learner.optimizer.state_dict(),
            'ema': learner.ema.state_dict() if learner.ema is not None else None,
            'scaler': learner.scaler.state_dict(), 'state': dataclasses.asdict(run.progress),
            'device_type': run.device.type, 'torch_rng': torch.get_rng_state(),
            'aug_rng': learner.aug.get_state() if learner.aug is not None else None,
            'cuda_rng': torch.cuda.get_rng_state(run.device) if on_cuda else None}


def save_last_and_exit(run, epoch):
    """After Ctrl-C or SIGTERM: last.pt (process 0), then exit with the signal's code."""
    if run.rank == 0:
        path = os.path.join(run.out_dir, 'last.pt')
        models.save_file(path, checkpoint(run, 'last'))
        run.log(f'saved {path} at epoch {epoch + 1} step {run.progress.step}')
    raise SystemExit(128 + (Signals.caught or signal.SIGINT))  # another process may have had it


def restore(run, resume):
    """Continue from a last.pt. The device may differ from the one that saved it: tensors are
    loaded on the CPU and moved, but a random generator's state only fits a generator of the same
    kind of device (a CUDA one is 16 bytes, a CPU one 5,056), so then the draws are seeded
    afresh."""
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
        raise models.CheckpointError(f'{run.out_dir}/last.pt does not fit this run '
                                     f'({type(e).__name__}: '
                                     f'{str(e).splitlines()[0][:200]})') from None
    try:
        if learner.aug is not None:
            learner.aug.set_state(resume['aug_rng'])
        if run.device.type == 'cuda':
            torch.cuda.set_rng_state(resume['cuda_rng'], run.device)
    except (RuntimeError, TypeError):  # saved on another kind of device: its states do not fit
        p = run.progress
        if learner.aug is not None:
            learner.aug.manual_seed(augmentation_seed(run, p.epoch, p.step))
        saved_on = resume.get('device_type', 'another device')
        run.log(f'warning: last.pt was saved on {saved_on}, this run goes on on {run.device.type}: '
                'the same weights, optimizer and schedule, but other random draws (augmentation, '
                'dropout) than an uninterrupted run')
    run.log(f'resumed at epoch {run.progress.epoch + 1} step {run.progress.step} '
            f'(best val RMSE {run.progress.best_val_rmse:.3f})')
