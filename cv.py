"""K-fold cross-validation, grouped by person and stratified by age, with a grid search.

    python cv.py --demo --model resnet50                          # synthetic faces, on a laptop CPU
    python cv.py --model resnet50 --loss smoothl1 --folds 5       # the real data in data/wiki
    python cv.py --model cnn --weights none --folds 5 --grid lr=1e-3,3e-4 loss=mse,smoothl1
    python cv.py --model cnn --folds 5 --jobs 2                   # two runs at once
    torchrun --nproc_per_node=4 cv.py ...                         # spread the runs over 4 GPUs

Every training option of train.py works here under the same name and is fixed for all runs
(train.py's own --val-frac, --out-dir and --resume are cv.py's --folds, --out-dir and running the
same command again); --grid gives an option several values, and every combination runs on every
fold. The images are decoded once for the whole grid. Running the same command again skips the
finished (combination, fold) pairs and resumes an interrupted one. The run directory gets
folds.csv, results.csv, summary.csv, oof_predictions.csv, predictions.png, error_by_decade.png and
fold_models.csv (for `python predict.py --checkpoint RUN_DIR`).

With --jobs N, N runs train at once, each in a process of its own with the cores shared among
them (one thread each on N cores): on a CPU where two one-thread runs train more images a second
than one run with a thread per core (`python bench.py --side-by-side` measures it), that is more
training in the same time. Each line of a run's log starts with its number, [3/5].
"""
import argparse
import contextlib
import datetime
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pandas as pd
import torch.distributed as dist

import clean_data
import cli
import dataset
import metrics
import models
import train

# Options --grid cannot search: where the data is and how to run (not what to train), and cv.py's
# own. The same command again resumes whatever the how-to-run options say.
HOW_TO_RUN = (*cli.HOW_TO_RUN, 'compile', 'jobs', 'run')
# The model too: its per-model defaults (weights, size, loss, ...) are filled in once.
NOT_GRIDDABLE = {'model', 'data', 'csv', 'demo', 'limit', 'seed', 'folds', 'grid', 'out_dir',
                 'keep_all_models', *HOW_TO_RUN}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_train_options(parser, train.RECIPE, train.DEMO)
    parser.add_argument('--folds', type=cli.number(int, at_least=2),
                        help=f'folds, grouped by person (default: '
                             f'{cli.per_model(train.RECIPE, "folds")})')
    parser.add_argument('--grid', nargs='+', default=[], metavar='OPTION=V1,V2',
                        help='options to search, e.g. lr=1e-3,3e-4 loss=mse,smoothl1 '
                             'batch_size=64,128')
    parser.add_argument('--out-dir', help='run directory (default: runs/cv-MODEL, or '
                                          'runs/cv-demo-MODEL)')
    parser.add_argument('--keep-all-models', action='store_true',
                        help='keep every fold model of every combination, not only the best '
                             'combination')
    parser.add_argument('--jobs', type=cli.number(int, at_least=1), default=1,
                        help='runs that train at once, each in a process of its own with the cores '
                             'shared among them; 1: one after another with a thread per core '
                             '(under torchrun each process trains its own runs one after another)')
    parser.add_argument('--run', type=cli.number(int, at_least=0),
                        help=argparse.SUPPRESS)  # a worker process: run number RUN only
    return parser


def parse_grid(parser, items):
    """['lr=1e-3,3e-4', 'loss=mse'] -> [{'lr': 0.001, 'loss': 'mse'}, {'lr': 0.0003, 'loss':
    'mse'}]. Each value is parsed by the command-line option of the same name, so it is converted
    and checked exactly as `--lr 1e-3` would be."""
    defaults = vars(parser.parse_args([]))
    switches = {a.dest for a in parser._actions if a.nargs == 0}
    keys, value_lists = [], []
    for item in items:
        key, sep, values = item.partition('=')
        key = key.strip().lstrip('-').replace('-', '_')
        if not sep or not values:
            parser.error(f'--grid {item!r}: expected OPTION=V1,V2,...')
        if key not in defaults or key in NOT_GRIDDABLE:
            parser.error(f'--grid {item!r}: {key} is not a training option that can be searched')
        if key in keys:
            parser.error(f'--grid: {key} is given twice')
        flag, converted = '--' + key.replace('_', '-'), []
        for v in values.split(','):
            v = v.strip()
            if key in switches:  # such as --no-augment or --tta
                if v.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
                    parser.error(f'--grid {key}: {v!r} is not true/false')
                converted.append(v.lower() in ('true', '1', 'yes'))
            else:
                converted.append(getattr(parser.parse_args([f'{flag}={v}']), key))
        twice = [v for i, v in enumerate(converted) if v in converted[:i]]
        if twice:  # 1e-3,0.001 would run the same combination twice under one name
            parser.error(f'--grid {item!r}: {twice[0]} is given twice')
        keys.append(key)
        value_lists.append(converted)
    return [dict(zip(keys, combo)) for combo in itertools.product(*value_lists)]


def combo_name(combo):
    """A folder name for a combination: 'lr=0.001_loss=mse', or 'base' without a grid."""
    if not combo:
        return 'base'
    return '_'.join(re.sub(r'[^A-Za-z0-9.=+-]', '-', f'{k}={v}') for k, v in combo.items())


def command_line(script, args):
    """The command that reproduces args: every option that differs from its default."""
    return ' '.join(['python', script,
                     *cli.flags(build_parser(), vars(args), skip=('grid', 'demo'),
                                changed_only=True)])


def summarize(results):
    """One row per combination: mean and sample standard deviation (ddof=1) over folds of RMSE, MAE
    and R^2 on the test-like rows (and of RMSE on the old clean rows), best first. A combination
    that diverged on any fold gets no mean (NaN) and sorts last. mean_rmse: what predicting the
    training rows' mean age scores on the same validation rows, the line any model must beat."""
    columns = [m for m in (*train.VAL_SCORES, 'mean_rmse') if m in results]
    grouped = results.groupby('combination', sort=False)
    summary = grouped[columns].agg(['mean', 'std'])
    summary.columns = [f'{m}_{s}' for m, s in summary.columns]
    scores = list(summary.columns)
    summary['folds'] = grouped.size()
    summary['diverged'] = grouped['rmse'].apply(lambda r: int(r.isna().sum()))
    summary.loc[summary['diverged'] > 0, scores] = np.nan
    summary['seconds'] = grouped['seconds'].sum()
    return summary.sort_values('rmse_mean').reset_index()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = cli.parse_args(parser, argv, cv=True)
    combos = parse_grid(parser, args.grid)
    for combo in combos:  # each combination must be a valid train.py run
        cli.check_args(parser, argparse.Namespace(**{**vars(args), **combo}))
    name = f'cv-demo-{args.model}' if args.demo else f'cv-{args.model}'
    args.out_dir = args.out_dir or os.path.join('runs', name)
    if args.run is not None:  # one run of a parallel cv.py: the parent checked everything
        return cli.run(lambda: worker_command(args, combos), batch_size=args.batch_size)
    # The same command again resumes; a different one must not mix its results into this folder.
    identity = {k: v for k, v in vars(args).items() if k not in HOW_TO_RUN}
    if cli.in_use(args.out_dir):  # the same command in two terminals
        return 1
    check_out_dir(parser, args.out_dir, identity)
    return cli.run(lambda: cv_command(args, combos, identity, argv), batch_size=args.batch_size,
                   interrupted='interrupted; run the same command again to go on')


def check_out_dir(parser, out_dir, identity):
    """A usage error when out_dir holds results of another command, or is not a cv.py run. A folder
    whose run failed before any result (bad data, too many folds) is free for the corrected
    command."""
    config_path = os.path.join(out_dir, 'config.json')
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        cells = os.path.join(out_dir, 'cells')
        has_results = any(name in ('result.json', 'last.pt')
                          for _, _, names in os.walk(cells) for name in names)
        if changed and has_results:
            parser.error(f'--out-dir {out_dir} holds a CV run with other options '
                         f'({", ".join(changed)}); choose a new --out-dir')
    elif cli.holds_a_run(out_dir):
        parser.error(f'--out-dir {out_dir} exists and is not a cv.py run; choose a new --out-dir')


def cv_command(args, combos, identity, argv):
    # Under torchrun each process takes every world_size-th (combination, fold) run on its own GPU;
    # gloo only for the final barrier, with a long timeout: a rank may wait hours for the others.
    with models.distributed(args.device, backend='gloo',
                            timeout=datetime.timedelta(days=7)) as (rank, world, device):
        log = cli.log_on(rank)
        table, images = train.load_data(args, log, rank, world)
        folds = clean_data.person_folds(table['person'], table['age'], args.folds, args.seed)
        check_folds(args, combos, table, folds)
        cells = all_runs(combos, args.folds)
        jobs, threads = parallel_plan(args, world, len(cells))
        side_by_side = f', {jobs} at a time, {threads} thread(s) each' if jobs > 1 else ''
        precision, why = models.choose_precision(args.precision, device, args.demo)
        log(f'{len(table)} rows, {table["person"].nunique()} people, {args.folds} folds of '
            f'{np.bincount(folds).tolist()} rows; {len(combos)} combination(s) -> {len(cells)} '
            f'runs{side_by_side}; {precision}: {why}')
        # made and claimed only now that the inputs are checked
        with cli.output_folder(args.out_dir, claim=rank == 0), tidy_on_failure(args.out_dir, rank):
            if rank == 0:
                dataset.write_json(identity, os.path.join(args.out_dir, 'config.json'))
                dataset.write_csv(pd.DataFrame({'ID': table['ID'], 'person': table['person'],
                                                'fold': folds}),
                                  os.path.join(args.out_dir, 'folds.csv'))
            if jobs > 1:
                del images  # each worker reads its own copy from the image cache
                run_parallel(args, argv, combos, cells, jobs, threads, log)
            else:
                images = dataset.place_images(images, device, log)
                with models.cpu_threads(args.threads):
                    run_in_turn(args, combos, cells, folds, table, images, device, log, rank,
                                world)
            if world > 1:
                dist.barrier()
            if rank == 0:
                report(args, combos, log)


@contextlib.contextmanager
def tidy_on_failure(out_dir, rank):
    """If the command fails (a full disk, bad data, Ctrl-C), remove what holds no work: cell folders
    without a checkpoint, and while no run has a result or a last.pt, config.json and folds.csv too,
    so that the folder is as free as before for the same command or a corrected one."""
    try:
        yield
    except BaseException:
        if rank == 0:
            cells = os.path.join(out_dir, 'cells')
            runs = glob.glob(os.path.join(cells, '*', 'fold*'))
            working = {r for r in runs if any(os.path.exists(os.path.join(r, name))
                                              for name in ('result.json', 'last.pt'))}
            for r in set(runs) - working:  # the same command would start these afresh anyway
                shutil.rmtree(r, ignore_errors=True)
            if not working:
                for name in ('config.json', 'folds.csv'):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(out_dir, name))
                shutil.rmtree(cells, ignore_errors=True)
        raise


def run_in_turn(args, combos, cells, folds, table, images, device, log, rank, world):
    """The runs one after another in this process (under torchrun: every world-th on this one)."""
    try:
        for i, (c, k) in enumerate(cells):
            if i % world == rank:
                run_cell(args, combos[c], k, folds, table, images, device,
                         tagged(log, i, len(cells)))
    except SystemExit:  # Ctrl-C or SIGTERM: the run's last.pt is saved
        log('interrupted; run the same command again to go on')
        raise


def all_runs(combos, folds):
    """Every (combination, fold) pair, in the order of their run numbers."""
    return [(c, k) for c in range(len(combos)) for k in range(folds)]


def tagged(log, i, n):
    """The log of run i of n: every line starts with [i+1/n], so side-by-side runs stay readable."""
    return lambda *a: log(f'[{i + 1}/{n}]', *a)


# ----------------------------------------------------------------------------- runs side by side

def parallel_plan(args, world, n_runs):
    """(runs at once, CPU threads of each): --jobs, never more than the runs, and --threads or
    the cores shared among the runs at once. Under torchrun each process trains its share of the
    runs one after another."""
    jobs = 1 if world > 1 else min(args.jobs, n_runs)
    return jobs, args.threads or (max(1, models.cpu_cores() // jobs) if jobs > 1 else None)


def run_parallel(args, argv, combos, cells, jobs, threads, log):
    """Each run not done before in a worker process (this script with --run I), `jobs` at a time.
    The workers have sessions of their own, out of the terminal's reach: a Ctrl-C or SIGTERM here
    reaches each once, as SIGTERM (which also stops a worker still starting up without a word);
    each saves its last.pt at the end of its step and stops, and the same command again goes on
    from there."""
    n, start = len(cells), time.time()
    pending = []
    for i, (c, k) in enumerate(cells):
        if os.path.exists(os.path.join(cell_dir(args, combos[c], k), 'result.json')):
            tagged(log, i, n)(f'{combo_name(combos[c])} fold {k}: done before, skipped')
        else:
            pending.append(i)
    done, failed = n - len(pending), []
    with forwarding_signals() as workers:
        while workers.running or (pending and not workers.caught):
            while pending and len(workers.running) < jobs and not workers.caught:
                i = pending.pop(0)
                command = [sys.executable, os.path.abspath(__file__), *argv, '--run', str(i),
                           '--threads', str(threads)]
                # The thread count in the environment too: OpenMP then starts with it, which
                # runs faster than resizing its pool later.
                env = {**os.environ, 'OMP_NUM_THREADS': str(threads),
                       'MKL_NUM_THREADS': str(threads)}
                workers.running[i] = subprocess.Popen(command, env=env, start_new_session=True)
            time.sleep(0.2)
            for i, proc in list(workers.running.items()):
                if proc.poll() is None:
                    continue
                del workers.running[i]
                if proc.returncode == 0:
                    done += 1
                    tagged(log, i, n)(f'finished: {done} of {n} runs done, elapsed '
                                      f'{train.hms(time.time() - start)}')
                elif not workers.caught:
                    failed.append(f'[{i + 1}/{n}]')
    if workers.caught:
        if workers.caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        cli.error('interrupted (SIGTERM); run the same command again to go on')
        raise SystemExit(128 + signal.SIGTERM)
    if failed:
        raise dataset.DataError(f'run(s) {", ".join(failed)} failed (their error is above); run '
                                'the same command again to retry them')


@contextlib.contextmanager
def forwarding_signals():
    """workers.running (run number -> process) get a SIGTERM for every Ctrl-C and SIGTERM this
    process gets (a second one makes them give up at once); workers.caught lists the signals that
    came. If this process fails, they are stopped the same way: each saves its last.pt."""
    workers = types.SimpleNamespace(running={}, caught=[])

    def forward(signum, frame):
        if not workers.caught:
            print(f'\n{signal.Signals(signum).name}: every run stops after its current step and '
                  'saves last.pt ...', flush=True)
        workers.caught.append(signum)
        for proc in workers.running.values():
            proc.send_signal(signal.SIGTERM)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield workers
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in workers.running.values():  # only after an error here: stop them cleanly
            proc.send_signal(signal.SIGTERM)
            proc.wait()


def worker_command(args, combos):
    """--run I: train run I alone, with --threads CPU threads; cv_command made the folder."""
    with models.cpu_threads(args.threads):
        device = models.pick_device(args.device)
        table, images = train.load_data(args, log=lambda *a: None)  # the parent said it all
        folds = clean_data.person_folds(table['person'], table['age'], args.folds, args.seed)
        cells = all_runs(combos, args.folds)
        c, k = cells[args.run]
        images = dataset.place_images(images, device)
        log = tagged(lambda *a: print(*a, flush=True), args.run, len(cells))
        run_cell(args, combos[c], k, folds, table, images, device, log)


def check_folds(args, combos, table, folds):
    """Every fold validates on at least one test-like row and trains on at least two rows under
    every combination's filters: checked for all runs before the first one starts."""
    for k in range(args.folds):
        if (folds == k).sum() == 0:
            raise dataset.DataError(f'{args.folds} folds but only '
                                    f'{table["person"].nunique()} people; use fewer --folds')
        if len(clean_data.validation_rows(table, folds, k)) == 0:
            raise dataset.DataError(f'fold {k} of {args.folds} has no test-like row to validate on '
                                    f'({clean_data.TEST_LIKE}) among '
                                    f'{int((folds == k).sum())} rows; use fewer --folds or more '
                                    'rows')
        for combo in combos:
            clean_data.training_rows(table, np.flatnonzero(folds != k),
                                     argparse.Namespace(**{**vars(args), **combo}),
                                     where=f'fold {k}\'s training part ({combo_name(combo)})')


def cell_dir(args, combo, k):
    return os.path.join(args.out_dir, 'cells', combo_name(combo), f'fold{k}')


def run_cell(args, combo, k, folds, table, images, device, log):
    """Train one (combination, fold) unless it finished before; resume it if it was interrupted."""
    out, name = cell_dir(args, combo, k), combo_name(combo)
    if os.path.exists(os.path.join(out, 'result.json')):
        log(f'{name} fold {k}: done before, skipped')
        return
    resume = None
    if os.path.exists(os.path.join(out, 'last.pt')):
        resume = models.load_checkpoint(os.path.join(out, 'last.pt'), resumable=True)
    elif os.path.isdir(out):
        shutil.rmtree(out)  # died before its first checkpoint: start it again
    os.makedirs(out, exist_ok=True)
    cell_args = argparse.Namespace(**{**vars(args), **combo})
    val_rows = clean_data.validation_rows(table, folds, k)
    train_rows = clean_data.training_rows(table, np.flatnonzero(folds != k), cell_args)
    log(f'{name} fold {k}: {len(train_rows)} train / {len(val_rows)} validation rows')
    try:
        rows = clean_data.make_rows(cell_args, images, table, train_rows, val_rows)
        result = train.fit(cell_args, rows, out, device, resume=resume, log=log)
        result.pop('val_pred')
    except train.Diverged as e:  # a too-high learning rate in a grid is a result, not a crash
        log(f'{name} fold {k}: {e}')
        result = {**train.val_columns(), 'best_epoch': -1, 'train_img_per_s': math.nan,
                  'seconds': 0.0, 'stopped': 'diverged'}
    ages = table['age'].to_numpy(dtype=np.float64)
    mean_guess = np.full(len(val_rows), ages[train_rows].mean())
    result['mean_rmse'] = metrics.scores(ages[val_rows], mean_guess)['rmse']
    dataset.write_json({**combo, 'combination': name, 'fold': k, **result},
                       os.path.join(out, 'result.json'))


def report(args, combos, log):
    """Every run's result: results.csv, summary.csv and the table; for the best combination the
    pooled out-of-fold predictions, its fold models, and the commands that come next."""
    results = read_results(args, combos)
    dataset.write_csv(results, os.path.join(args.out_dir, 'results.csv'))
    summary = summarize(results)
    dataset.write_csv(summary, os.path.join(args.out_dir, 'summary.csv'))
    with pd.option_context('display.width', 200, 'display.max_columns', 20,
                           'display.float_format', '{:.3f}'.format):
        log('\nsummary (mean and std over folds, best first):\n' + summary.to_string(index=False))
    if summary['rmse_mean'].isna().all():
        log('every combination diverged on some fold: no best combination (try lower learning '
            'rates)')
        return
    best_name = summary['combination'].iloc[0]
    best = next(c for c in combos if combo_name(c) == best_name)
    overall = pool_best(args, best, results, log)
    if not args.keep_all_models:
        for combo in combos:
            for k in range(args.folds):
                path = os.path.join(cell_dir(args, combo, k), 'best.pt')
                if combo is not best and os.path.exists(path):
                    os.remove(path)
    top = summary.iloc[0]
    log(f'\nbest: {best_name}: RMSE {top["rmse_mean"]:.3f} +- {top["rmse_std"]:.3f}, R^2 '
        f'{top["r2_mean"]:.3f}; all out-of-fold predictions pooled: RMSE {overall["rmse"]:.3f}, '
        f'R^2 {overall["r2"]:.3f}')
    best_args = argparse.Namespace(**{**vars(args), **best, 'out_dir': None})
    log('reproduce the best combination:\n  ' + command_line('cv.py', best_args))
    log(f'submission from its fold models:\n  python predict.py --checkpoint {args.out_dir} '
        f'--data {args.data}')


def read_results(args, combos):
    """A row per (combination, fold) from the runs' result.json files; all must be there."""
    paths = [(combo, k, os.path.join(cell_dir(args, combo, k), 'result.json'))
             for combo in combos for k in range(args.folds)]
    missing = [path for _, _, path in paths if not os.path.exists(path)]
    if missing:  # a torchrun process failed, or the files went missing after the run
        more = ' ...' if len(missing) > 5 else ''
        raise dataset.DataError(f'{len(missing)} run(s) have no result: {", ".join(missing[:5])}'
                                f'{more}; run the same command again to train them')
    rows = []
    for combo, k, path in paths:
        with open(path) as f:
            r = json.load(f)
        scores = {key: r.get(f'val_{key}', math.nan) for key in train.VAL_SCORES}
        rows.append({**{key: r[key] for key in combo}, 'combination': r['combination'], 'fold': k,
                     **scores, 'mean_rmse': r.get('mean_rmse', math.nan),
                     'best_epoch': r['best_epoch'], 'img_per_s': r['train_img_per_s'],
                     'seconds': r['seconds']})
    return pd.DataFrame(rows)


def pool_best(args, best, results, log):
    """The best combination's out-of-fold predictions pooled (oof_predictions.csv and the plots,
    with the warning of a collapse) and its fold models (fold_models.csv, what predict.py takes).
    Returns the pooled scores."""
    name = combo_name(best)
    oof = []
    for k in range(args.folds):
        v = pd.read_csv(os.path.join(cell_dir(args, best, k), 'val_predictions.csv'))
        oof.append(v.assign(fold=k)[['ID', 'fold', 'age', 'prediction']])
    oof = pd.concat(oof).sort_values('ID')
    dataset.write_csv(oof, os.path.join(args.out_dir, 'oof_predictions.csv'))
    metrics.report(os.path.join(args.out_dir, 'predictions.png'),
                   os.path.join(args.out_dir, 'error_by_decade.png'), oof['age'], oof['prediction'],
                   f'{args.model}, {name}, out-of-fold ({args.folds} folds)', log)
    checkpoints = [os.path.relpath(os.path.join(cell_dir(args, best, k), 'best.pt'), args.out_dir)
                   for k in range(args.folds)]
    fold_rmse = results.loc[results['combination'] == name, 'rmse'].to_numpy()
    dataset.write_csv(pd.DataFrame({'fold': range(args.folds), 'checkpoint': checkpoints,
                                    'val_rmse': fold_rmse}),
                      os.path.join(args.out_dir, 'fold_models.csv'))
    return metrics.scores(oof['age'], oof['prediction'])


if __name__ == '__main__':
    sys.exit(main())
