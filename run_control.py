"""What a first read of train.py may skip: catching Ctrl-C and SIGTERM, and last.pt, the whole state
of a run, from which `train.py --resume` continues exactly where it stopped (mid-epoch included).

train.py's loop runs inside `guarding` (signals caught, and a full disk said in one line) and
reads `Signals.caught` after each step; `save_last` writes last.pt after each epoch and on a
signal, `restore` reads it back before the loop. Both take the parts of a run by name, so nothing
here needs to know how train.py holds them.
"""
import contextlib
import signal

import torch

import dataset
import models


class Signals:
    """While training, Ctrl-C / SIGTERM set `caught` and the loop saves last.pt at the end of the
    step; a second Ctrl-C gives up at once. Outside training they act as usual."""
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

    @classmethod
    def exit_code(cls):
        """128 + the signal, as a shell reports a process a signal ended (under torchrun another
        process may have had it: then SIGINT's)."""
        return 128 + (cls.caught or signal.SIGINT)


@contextlib.contextmanager
def guarding(out_dir, saved):
    """What train.py's loop runs inside: Ctrl-C and SIGTERM caught (it yields Signals, whose
    `caught` the loop reads), and a file that cannot be written (a full disk) ending the run with
    one line that also says what the run folder still holds: `saved` ({'best.pt': epoch,
    'last.pt': epoch}), the checkpoints written before, which the failed write left intact."""
    with Signals.catching():
        try:
            yield Signals
        except dataset.WriteError as e:
            kept = [f'best.pt of epoch {saved["best.pt"]} is intact'] if 'best.pt' in saved \
                else ['no best.pt was saved']
            if 'last.pt' in saved:
                kept.append(f'last.pt holds the run after epoch {saved["last.pt"]}')
            raise dataset.WriteError(f'{e}; in {out_dir}, {" and ".join(kept)}') from None


def save_last(path, fields, parts, augment_rng, device):
    """last.pt: `fields` (what best.pt holds besides the weights, and the loop's 'state'), the
    state dict of each of `parts` ({'model': ..., 'optimizer': ..., 'ema': ..., 'scaler': ...};
    None stays None) and the random generators: the global one (dropout), the augmentation's and,
    on a GPU, CUDA's."""
    on_cuda = device.type == 'cuda'
    states = {name: part.state_dict() if part is not None else None for name, part in parts.items()}
    models.save_file(path, {
        **fields, **states, 'device_type': device.type, 'torch_rng': torch.get_rng_state(),
        'aug_rng': augment_rng.get_state() if augment_rng is not None else None,
        'cuda_rng': torch.cuda.get_rng_state(device) if on_cuda else None})


def restore(ckpt, path, parts, augment_rng, device, log=print):
    """Load last.pt (`ckpt`, read from `path`) into `parts` and the random generators. Returns (its
    loop 'state', whether the generators could take their saved states). The device may differ
    from the one that saved it: tensors are loaded on the CPU and moved, but a generator's state
    only fits a generator of the same kind of device (a CUDA one is 16 bytes, a CPU one 5,056),
    so then the caller draws afresh."""
    try:
        for name, part in parts.items():
            if part is not None and (name != 'scaler' or ckpt[name]):  # a disabled scaler: {}
                part.load_state_dict(ckpt[name])
        torch.set_rng_state(ckpt['torch_rng'])  # dropout draws from the global generator on CPUs
        state = dict(ckpt['state'])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise models.CheckpointError(f'{path} does not fit this run ({type(e).__name__}: '
                                     f'{str(e).splitlines()[0][:200]})') from None
    try:
        if augment_rng is not None:
            augment_rng.set_state(ckpt['aug_rng'])
        if device.type == 'cuda':
            torch.cuda.set_rng_state(ckpt['cuda_rng'], device)
    except (RuntimeError, TypeError):  # saved on another kind of device: its states do not fit
        log(f'warning: last.pt was saved on {ckpt.get("device_type", "another device")}, this run '
            f'goes on on {device.type}: the same weights, optimizer and schedule, but other random '
            'draws (augmentation, dropout) than an uninterrupted run')
        return state, False
    return state, True
