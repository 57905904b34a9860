import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clean_data  # noqa: E402
import train  # noqa: E402
import demo_data  # noqa: E402

# A run that takes seconds: the cnn at 32 px, two epochs, a progress line every step.
FAST = ['--model', 'cnn', '--weights', 'none', '--size', '32', '--batch-size', '16', '--epochs',
        '2', '--device', 'cpu', '--log-every', '1']


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


def usage_error(main, argv, capsys):
    """The last line argparse prints for a usage error (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def copy_data(tiny_data, tmp_path, images=True):
    """A copy of tiny_data to edit; images=False leaves its image folder empty."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data,
                    ignore=None if images else shutil.ignore_patterns('wiki_labeled'))
    (data / 'wiki_labeled').mkdir(exist_ok=True)
    return data


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A small synthetic Kaggle-layout folder, cleaned: about 100 usable faces, 20 test images."""
    root = tmp_path_factory.mktemp('tiny')
    demo_data.make_demo_data(str(root), n=200, n_judge=20, seed=1)
    assert clean_data.main(['--data', str(root)]) == 0
    return str(root)


@pytest.fixture(scope='session')
def trained(tiny_data, tmp_path_factory):
    """A tiny cnn trained on tiny_data (2 epochs, 32 px): the run directory. test_train.py has its
    own."""
    out = tmp_path_factory.mktemp('run') / 'cnn'
    assert train.main(['--data', tiny_data, '--out-dir', str(out), '--model', 'cnn', '--weights',
                       'none',
                       '--size', '32', '--batch-size', '16', '--epochs', '2', '--device', 'cpu',
                       '--log-every', '1']) == 0
    return str(out)


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal: a shell starts background jobs (`pytest
    &`, nohup) with SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope='session')
def interrupt():
    """interrupt(argv, at, after=None, sig=SIGINT) -> (exit code, output): run `python *argv` in the
    project folder and send it `sig` (Ctrl-C) at the first line of its output that starts with
    `at`, once a line starting with `after` has been seen (if given). What every stop-and-resume
    test begins with."""
    def run(argv, at, after=None, sig=signal.SIGINT):
        proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines, armed, sent = [], after is None, False
        for line in proc.stdout:
            lines.append(line)
            armed = armed or line.startswith(after)
            if armed and not sent and line.startswith(at):
                proc.send_signal(sig)
                sent = True
        return proc.wait(timeout=120), ''.join(lines)
    return run
