"""bench.py end to end on the CPU, in its --quick smoke-test form."""
import json
import math

import bench

KEYS = ['pipeline_ours_img_per_s', 'pipeline_naive_img_per_s', 'pipeline_ratio', 'step_img_per_s',
        'loop_img_per_s', 'loop_ratio', 'predict_img_per_s', 'step_tflops']


def test_quick_bench_writes_all_figures(tmp_path):
    path = tmp_path / 'bench.json'
    assert bench.main(['--model', 'cnn', '--size', '32', '--batch-size', '8', '--device', 'cpu',
                       '--quick',
                       # the loop keeps a moving average too
                       '--ema', '0.9', '--json', str(path)]) == 0
    with open(path) as f:
        result = json.load(f)
    for key in KEYS:
        assert isinstance(result[key], float), key
        assert math.isfinite(result[key]) and result[key] > 0, key
    ratio = result['pipeline_ours_img_per_s'] / result['pipeline_naive_img_per_s']
    assert result['pipeline_ratio'] == ratio
    assert result['loop_ratio'] == result['loop_img_per_s'] / result['step_img_per_s']
    assert result['mfu'] is None and result['peak_mem_gb'] is None  # CUDA only
    assert (result['model'], result['size'], result['batch_size'],
            result['device']) == ('cnn', 32, 8, 'cpu')
    assert (result['ema'], result['compile']) == (0.9, None)
    assert result['step_steps'] >= 3 and result['loop_steps'] >= 3
