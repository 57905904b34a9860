import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clean_data  # noqa: E402
import demo_data  # noqa: E402


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A small synthetic Kaggle-layout folder, cleaned: about 100 usable faces, 20 test images."""
    root = tmp_path_factory.mktemp('tiny')
    demo_data.make_demo_data(str(root), n=200, n_judge=20, seed=1)
    assert clean_data.main(['--data', str(root)]) == 0
    return str(root)
