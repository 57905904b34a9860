"""The command line every script shares: the --help layout, the training options of train.py and
cv.py (their defaults from train.py's RECIPE table), number flags that refuse what cannot work,
and one way to end on a mistake the user can fix.

A mistake ends a script with one line on stderr that names the file, row or flag, and an exit
code: 2 for a flag (argparse's usage errors), 1 for a bad input file or a run that failed, 130 for
Ctrl-C. No traceback, and nothing half-written: each script checks its inputs before it writes
its first output, and a folder it made for a run that failed before writing anything is removed.
A run folder is claimed by one command at a time (output_folder).
"""
import argparse
import contextlib
import math
import os
import sys

try:
    import fcntl  # file locks: Linux and macOS
except ImportError:  # Windows
    fcntl = None

import torch

import dataset
import models

DEVICES = ('auto', 'cpu', 'cuda', 'mps')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
DEMO_DIR = os.path.join('data', 'demo')
# Options that say how to run, not what to train: they may change when a run is resumed.
HOW_TO_RUN = ('device', 'precision', 'time_limit', 'log_every', 'threads')


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the module docstring's command lines as written, and each option's
    default once (not for switches, nor where the help already says what happens without it)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def number(kind=float, at_least=None, above=None, at_most=None, below=None, minus_infinity=False):
    """An argparse `type` for a number flag: `kind` (float or int), within the bounds given. NaN is
    never a value a flag can mean, nor infinity, but for -inf where `minus_infinity` allows it (a
    face-score threshold of -inf keeps every row). A value outside is a usage error naming the
    flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not '
                                             f'{"a whole number" if kind is int else "a number"}')
        if math.isnan(value) or (math.isinf(value) and not (minus_infinity and value < 0)):
            raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f'must be >= {at_least:g}, got {text}')
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f'must be > {above:g}, got {text}')
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f'must be <= {at_most:g}, got {text}')
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f'must be < {below:g}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    # what the tests check every number flag by
    parse.kind, parse.minus_infinity = kind, minus_infinity
    return parse


def add_device(parser, help='where to run'):
    parser.add_argument('--device', default='auto', choices=DEVICES, help=help)


def add_precision(parser):
    parser.add_argument('--precision', default='auto', choices=models.PRECISIONS,
                        help='what the convolutions compute in; auto: bf16 where the device '
                             'computes it natively (a CPU with AVX512-BF16 or AMX, an Ampere or '
                             'newer GPU), fp16 with loss scaling on older GPUs, else fp32 (and '
                             'fp32 with --demo)')


def add_compile(parser, help):
    parser.add_argument('--compile', nargs='?', const='default', metavar='MODE',
                        choices=COMPILE_MODES, help=help)


# ----------------------------------------------------------------------------- the training options

def per_model(recipe, key):
    """'dex for cnn, smoothl1 for resnet50' (or one value when the models agree): for --help."""
    values = {model: recipe[key][model] for model in models.MODELS}
    if len(set(values.values())) == 1:
        return f'{values[models.MODELS[0]]}'
    return ', '.join(f'{value} for {model}' for model, value in values.items())


def add_train_options(parser, recipe, demo):
    """Every option of one training run; cv.py takes the same ones under the same names. Their
    defaults come from `recipe` (a column per model) and with --demo from `demo`: train.py's
    RECIPE and DEMO, kept on the parser for parse_args."""
    parser.recipe, parser.demo = recipe, demo
    parser.add_argument('--data', default='data/wiki',
                        help='Kaggle folder (wiki_labels.csv, wiki_labeled/)')
    parser.add_argument('--csv', help='clean CSV from clean_data.py (default: '
                                      'DATA/wiki_labels_clean.csv)')
    add_recipe_options(parser, recipe)
    parser.add_argument('--balance-gender', action='store_true',
                        help='oversample the rarer gender in the TRAINING part (never in '
                             'validation)')
    parser.add_argument('--train-min-face-score', type=number(minus_infinity=True),
                        help='train only on rows with at least this face score (#NAME?, no face, '
                             'is -inf); validation keeps every row where a face was found, as the '
                             'test set does (default: '
                             f'{per_model(recipe, "train_min_face_score")})')
    parser.add_argument('--train-keep-second-face', action=argparse.BooleanOptionalAction,
                        help='also train on rows where a second face was detected (validation '
                             'always keeps them) (default: '
                             f'{per_model(recipe, "train_keep_second_face")})')
    parser.add_argument('--train-max-age', type=number(),
                        help='also drop training rows older than this')
    parser.add_argument('--train-min-age', type=number(),
                        help='also drop training rows younger than this')
    parser.add_argument('--patience', type=number(int, at_least=0),
                        help='stop after this many epochs without a better val RMSE; 0: never '
                             '(with a cosine decay the best epochs are the last) (default: '
                             f'{per_model(recipe, "patience")})')
    parser.add_argument('--limit', type=number(int, at_least=4),
                        help='use only N randomly chosen rows (smoke tests)')
    parser.add_argument('--seed', type=number(int, at_least=0), default=0,
                        help='seed of the split, the initial weights and the draws')
    add_device(parser, help='where to train')
    add_precision(parser)
    parser.add_argument('--threads', type=number(int, at_least=1),
                        help="CPU threads of a run (default: torch's, one per core; with cv.py "
                             '--jobs N, the cores shared among the N runs that train at once)')
    parser.add_argument('--time-limit', type=number(above=0),
                        help='minutes (in cv.py: for each run); stop cleanly after the step that '
                             'crosses it')
    add_compile(parser, help='torch.compile the model (a slower start); MODE reduce-overhead adds '
                             'CUDA graphs')
    parser.add_argument('--log-every', type=number(int, at_least=1), default=50,
                        help='steps between progress lines')
    parser.add_argument('--demo', action='store_true',
                        help=f'make synthetic data in {DEMO_DIR} if absent and use the CPU-sized '
                             'demo presets (train.py DEMO)')


def add_recipe_options(parser, recipe):
    """The options of the recipe: the network, its loss and optimizer, input and augmentation."""
    parser.add_argument('--model', default='resnet50', choices=models.MODELS, help='network')
    parser.add_argument('--weights', help='imagenet (torch hub cache), none (from scratch) or a '
                                          'state-dict FILE (default: '
                                          f'{per_model(recipe, "weights")})')
    parser.add_argument('--loss', choices=sorted(models.LOSSES),
                        help='training loss; dex: 101 age classes, soft labels, the expected age '
                             f'as prediction (default: {per_model(recipe, "loss")})')
    parser.add_argument('--epochs', type=number(int, at_least=1),
                        help='passes over the training rows (default: '
                             f'{per_model(recipe, "epochs")}; with --time-limit, as many as fit: '
                             'the limit ends the run, its learning-rate decay ending with it)')
    parser.add_argument('--batch-size', type=number(int, at_least=1),
                        help='images per step, over all GPUs (default: '
                             f'{per_model(recipe, "batch_gpu")} on a GPU, '
                             f'{per_model(recipe, "batch_cpu")} on the CPU)')
    parser.add_argument('--lr', type=number(above=0),
                        help='peak AdamW learning rate (warm-up, cosine decay) of the head, and of '
                             f'all layers from scratch (default: {per_model(recipe, "lr")})')
    parser.add_argument('--backbone-lr', type=number(above=0),
                        help='peak learning rate of a pretrained backbone (default: lr x '
                             f'{per_model(recipe, "backbone_lr_share")} with --weights imagenet or '
                             'FILE, else lr)')
    parser.add_argument('--weight-decay', type=number(at_least=0),
                        help='AdamW weight decay of conv and linear weights (norm layers and '
                             f'biases get none) (default: {per_model(recipe, "weight_decay")})')
    parser.add_argument('--ema', type=number(at_least=0, below=1),
                        help='decay of an exponential moving average of the weights, which is then '
                             f'what is validated and saved in best.pt; 0: off (default: '
                             f'{per_model(recipe, "ema")})')
    parser.add_argument('--tta', action=argparse.BooleanOptionalAction,
                        help='validate each face averaged with its mirror image (predict.py has '
                             f'its own) (default: {per_model(recipe, "tta")})')
    parser.add_argument('--size', type=number(int, at_least=1, at_most=models.MAX_SIZE),
                        help='model input size in pixels; the images are 100x100 '
                             f'(default: {per_model(recipe, "size")})')
    parser.add_argument('--no-augment', action='store_true',
                        help='no crop/flip/rotation/colour augmentation')


def demo_presets(parser, model, cv=False):
    """What --demo sets, for every option the command line leaves out: the model's column of the
    demo table, with cv.py's epochs for cv.py."""
    presets = {key: column[model] for key, column in parser.demo.items() if key != 'cv_epochs'}
    if cv:
        presets['epochs'] = parser.demo['cv_epochs'][model]
    return dict(presets, data=DEMO_DIR, model=model)


def parse_args(parser, argv=None, cv=False):
    """Parse, fill in the --demo presets (cv.py's with cv=True) and, for every option the command
    line leaves out whose name the recipe has, the model's entry (the batch size by the device),
    check."""
    args = parser.parse_args(argv)
    if args.demo:  # the presets become defaults, so every flag on the command line still wins
        parser.set_defaults(model='cnn')
        model = parser.parse_args(argv).model
        parser.set_defaults(**demo_presets(parser, model, cv))
        args = parser.parse_args(argv)
    for key, column in parser.recipe.items():
        if getattr(args, key, False) is None and not (key == 'epochs' and args.time_limit):
            setattr(args, key, column[args.model])
    if args.batch_size is None:
        auto_gpu = args.device == 'auto' and models.pick_device('auto').type != 'cpu'
        on_gpu = args.device in ('cuda', 'mps') or auto_gpu
        args.batch_size = parser.recipe['batch_gpu' if on_gpu else 'batch_cpu'][args.model]
    check_args(parser, args)
    return args


def check_size(parser, args):
    if args.size < models.MIN_SIZE[args.model]:
        parser.error(f'--size {args.size} is too small for {args.model} (at least '
                     f'{models.MIN_SIZE[args.model]})')


def check_args(parser, args):
    """What the flags' own types cannot check, as usage errors (exit code 2) before anything
    loads."""
    check_size(parser, args)
    if None not in (args.train_min_age,
                    args.train_max_age) and args.train_min_age > args.train_max_age:
        parser.error(f'--train-min-age {args.train_min_age:g} is above --train-max-age '
                     f'{args.train_max_age:g}')


def flags(parser, values, skip=(), changed_only=False):
    """The flags that give `values` (a dict of option values) to `parser`: '--lr=0.001' for a value,
    '--no-augment' for a switch that is on, '--tta' or '--no-tta' for a switch of both ways; with
    changed_only, only what differs from the defaults."""
    out = []
    for action in parser._actions:
        value = values.get(action.dest)
        if not action.option_strings or action.dest in ('help', *skip) or value is None:
            continue
        if changed_only and value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(action.option_strings[0 if value else 1])
        elif action.nargs != 0:
            out.append(f'{action.option_strings[-1]}={value}')
        elif value:  # a switch that is on
            out.append(action.option_strings[-1])
    return out


def how_to_go_on(out_dir):
    """What to type next for a folder that holds a run: --resume where last.pt is there, else a
    new folder (a run killed before its first last.pt has nothing to resume from); a folder that
    holds nothing (train.py's run failed before its first file) takes the same command again."""
    if os.path.exists(os.path.join(out_dir, 'last.pt')):
        return f'continue it with --resume {out_dir}, or choose a new --out-dir'
    if not holds_a_run(out_dir):
        return 'run the same command again'
    stem = os.path.normpath(out_dir)
    free = next(f'{stem}-{i}' for i in range(2, 10_000) if not os.path.exists(f'{stem}-{i}'))
    return f'it cannot be resumed (no last.pt): choose a new --out-dir, such as {free}'


def parse_saved(parser, values, source):
    """Options saved in a file (a checkpoint's vars(args)), parsed again as if typed, so that an
    edited or damaged value is refused by the same checks as on the command line, naming
    `source`."""
    def refuse(message):
        raise models.CheckpointError(f'{source}: its saved options are refused ({message})')
    parser.error = refuse
    return parse_args(parser, flags(parser, values, skip=('demo', 'resume', 'out_dir')))


def resumed_options(parser, args, fresh_parser):
    """train.py --resume RUN_DIR: (the options saved in RUN_DIR/last.pt, but for those that may
    change between sessions; the checkpoint), or (args, None) after a one-line error."""
    last = os.path.join(args.resume, 'last.pt')
    if not os.path.exists(last):
        if os.path.exists(os.path.join(args.resume, 'metrics.json')):
            parser.error(f'--resume {args.resume}: the run finished (metrics.json is there); its '
                         'best.pt is what predict.py takes')
        if not holds_a_run(args.resume):
            parser.error(f'--resume {args.resume}: no run is there to continue; start one with '
                         f'--out-dir {args.resume}')
        parser.error(f'--resume {args.resume}: ' + how_to_go_on(args.resume))
    try:
        resume = models.load_checkpoint(last, resumable=True)
        changeable = {k: getattr(args, k) for k in HOW_TO_RUN}
        saved = parse_saved(fresh_parser, {**resume['args'], **changeable}, last)
    except models.CheckpointError as e:
        error(f'--resume {args.resume}: {last} cannot be resumed from ({e})')
        return args, None
    return argparse.Namespace(**{**vars(saved), 'demo': bool(resume['args'].get('demo')),
                                 'resume': args.resume, 'out_dir': args.resume}), resume


# ---------------------------------------------------------------------- errors, exit codes, folders

def refuse_overwriting_inputs(parser, flag, out, inputs):
    """A usage error when the output file `out` is one of the input files: never overwrite an
    input."""
    if out is None:
        return
    for path in inputs:
        if path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(out, path):
            parser.error(f'{flag} {out} is an input of this command ({path}); choose another file')


def error(message):
    """One line on stderr, whatever the message holds (pandas' parser errors carry newlines)."""
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)


def run(work, batch_size=None, interrupted='interrupted'):
    """work() -> exit code. What a user can cause ends as one line on stderr: a UserError or an
    OSError 1, running out of GPU memory 1 (with a smaller --batch-size to try), Ctrl-C 130."""
    try:
        return work() or 0
    except dataset.UserError as e:
        error(e)
    except torch.OutOfMemoryError:
        error(f'out of GPU memory at --batch-size {batch_size}; try --batch-size '
              f'{max(1, (batch_size or 2) // 2)}')
    except KeyboardInterrupt:
        error(interrupted)
        return 130
    except OSError as e:  # a folder that cannot be made, a disk that is full, ...
        error(f'{e.filename}: {e.strerror or e}' if e.filename else e)
    return 1


def log_on(rank):
    """The log of a process: print (flushed, for `tail -f`) on process 0 of a torchrun job and in
    a plain run, nothing on the others, which would repeat it."""
    return (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)


LOCK = 'run.lock'  # in a folder a command writes its run into: the PID of that command


@contextlib.contextmanager
def output_folder(path, claim=True):
    """Make the folder `path` for what follows and claim it (claim=False: a torchrun process other
    than 0, whose process 0 holds it). The claim is a lock on the file run.lock, which holds the
    PID: a second command into the same folder ends with one line naming that PID, and a lock of a
    process that died (kill -9) is free again, as the system releases it. If what follows fails
    before anything was written into the folder, the folder is removed again."""
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise dataset.WriteError(f'cannot make the run folder {path} ({e.strerror or e})') from None
    lock = claim_folder(path) if claim else None
    try:
        yield path
    except BaseException:
        if lock is not None:
            release_folder(path, lock)
            lock = None
        if not existed and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise
    finally:
        if lock is not None:
            release_folder(path, lock)


def claim_folder(path):
    """Lock path/run.lock and write this process's PID into it; returns the open file descriptor,
    or None where the system has no file locks (Windows)."""
    if fcntl is None:
        return None
    lock = os.path.join(path, LOCK)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise dataset.UserError(f'{path} is in use by another run (PID {holder}); wait for it '
                                    'to end, or choose another folder') from None
        # the holder before us may have removed the file while we waited for it: lock anew
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return fd


def release_folder(path, fd):
    if fd is not None:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, LOCK))
        os.close(fd)


def folder_holder(path):
    """The PID (as text) of the live command that holds the folder `path`, or None."""
    lock = os.path.join(path, LOCK)
    if fcntl is None or not os.path.exists(lock):
        return None
    with open(lock, 'rb') as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read(64).decode(errors='replace').strip() or 'unknown'
    return None


def in_use(path):
    """Whether a live command holds the folder `path`; if so, says so in one line (its PID). Under
    torchrun only process 0 asks: it is the one that claims the folder."""
    holder = folder_holder(path) if path and os.environ.get('RANK', '0') == '0' else None
    if holder:
        error(f'{path} is in use by another run (PID {holder}); wait for it to end, or choose '
              'another folder')
    return bool(holder)


def holds_a_run(path):
    """Whether the folder `path` holds anything but a lock left behind."""
    return os.path.isdir(path) and any(name != LOCK for name in os.listdir(path))
