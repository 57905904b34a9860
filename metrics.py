"""Scoring age predictions by hand: RMSE, MAE and R^2, the RMSE in each decade of true age, a
warning when the predictions collapse to one age, and the two pictures every run draws (Pillow).

train.py's validation, cv.py's out-of-fold scores and predict.py --labels all score here, from
whole arrays of true and predicted ages, so the three report the same number for the same ages.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

import dataset

BLUE = (30, 90, 200)


def scores(age, pred):
    """{'rmse', 'mae', 'r2', 'n'} of predicted against true ages, over the whole arrays (an average
    of per-batch RMSEs would be another, wrong number). R^2 = 1 - SSE / (the sum of squares around
    the true mean): 0 for predicting the mean, 1 for no error, NaN when all true ages are equal."""
    age, pred = np.asarray(age, np.float64), np.asarray(pred, np.float64)
    n = len(age)
    if n == 0:
        return {'rmse': math.nan, 'mae': math.nan, 'r2': math.nan, 'n': 0}
    err = pred - age
    sse = float(np.sum(err * err))
    total = float(np.sum((age - age.mean()) ** 2))
    return {'rmse': math.sqrt(sse / n), 'mae': float(np.sum(np.abs(err))) / n,
            'r2': 1 - sse / total if total > 0 else math.nan, 'n': n}


def decade_name(d):
    """'0-9', '10-19', ... '80-89', '90+' for decade index d (0..9)."""
    return f'{d * 10}-{d * 10 + 9}' if d < 9 else '90+'


def rmse_by_decade(age, pred):
    """{'0-9': {'rmse': ..., 'n': ...}, ...} for the decades of true age that hold at least one
    face: where a model fails (children and the old, usually)."""
    age, pred = np.asarray(age, float), np.asarray(pred, float)
    decade = np.minimum(age // 10, 9).astype(int)
    err = pred - age
    return {decade_name(d): {'rmse': float(np.sqrt(np.mean(err[decade == d] ** 2))),
                             'n': int((decade == d).sum())}
            for d in range(10) if (decade == d).any()}


def collapse_warning(age, pred, truth_sd=None):
    """A warning when the predictions hardly vary (sd under a third of the true ages' sd): the
    classic failure on wiki faces, one age for everyone. None when they vary enough. Where the
    true ages are unknown (a test set), truth_sd stands in: the training ages' sd."""
    spread = float(np.std(pred))
    truth = float(np.std(age)) if truth_sd is None else truth_sd
    if len(pred) < 2 or spread >= truth / 3:
        return None
    whose = 'the true ages' if truth_sd is None else 'the training ages'
    return (f'warning: the predictions hardly vary (sd {spread:.1f} years, {whose} {truth:.1f}): '
            f'the model has collapsed towards the mean age {float(np.mean(pred)):.1f}. Usual '
            'causes: too few epochs or a learning rate far too high or too low, a model that did '
            'not train (see history.csv), or faces framed unlike the training crops')


def plot_predictions(path, age, pred, title):
    """Predicted against true age as a PNG: axes, ticks, the identity line, RMSE and R^2. The points
    are translucent, so that where thousands overlap the density shows instead of one blob."""
    age, pred = np.asarray(age, float), np.asarray(pred, float)
    m = scores(age, pred)
    width = height = 640
    left, bottom, top, right = 70, 60, 50, 20
    lo, hi = 0.0, max(100.0, float(np.ceil(max(age.max(), pred.max()) / 10) * 10))

    def px(a, p):
        return (left + (a - lo) / (hi - lo) * (width - left - right),
                height - bottom - (p - lo) / (hi - lo) * (height - bottom - top))

    im = Image.new('RGB', (width, height), 'white')
    # RGBA drawing on an RGB image blends each point into what is there
    d = ImageDraw.Draw(im, 'RGBA')
    d.rectangle([left, top, width - right, height - bottom], outline='black')
    for t in np.arange(lo, hi + 1, 10):
        x, _ = px(t, lo)
        _, y = px(lo, t)
        d.line([x, height - bottom, x, height - bottom + 5], fill='black')
        d.text((x - 8, height - bottom + 8), f'{t:g}', fill='black')
        d.line([left - 5, y, left, y], fill='black')
        d.text((left - 30, y - 6), f'{t:g}', fill='black')
    d.line([*px(lo, lo), *px(hi, hi)], fill=(200, 0, 0), width=2)  # perfect prediction
    alpha = int(255 * min(0.7, max(0.06, 300 / max(len(age), 1))))
    for a, p in zip(age, pred):
        x, y = px(a, p)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(*BLUE, alpha))
    d.text((left, 12), title, fill='black')
    d.text((left, 28), f'RMSE {m["rmse"]:.2f}  MAE {m["mae"]:.2f}  R^2 {m["r2"]:.3f}  n={m["n"]}',
           fill='black')
    d.text(((width + left) / 2 - 40, height - 25), 'actual age', fill='black')
    d.text((5, top - 20), 'predicted age', fill='black')
    dataset.write_atomic(path, lambda tmp: im.save(tmp))


def plot_error_by_decade(path, age, pred, title):
    """RMSE in each decade of the true age, with the face count on each bar."""
    by_decade = rmse_by_decade(age, pred)
    width, height, left, bottom, top = 640, 400, 60, 50, 50
    highest = max(5.0, np.ceil(max(v['rmse'] for v in by_decade.values()) / 5) * 5)
    im = Image.new('RGB', (width, height), 'white')
    d = ImageDraw.Draw(im)
    d.line([left, top, left, height - bottom, width - 20, height - bottom], fill='black')
    for t in np.arange(0, highest + 1, 5):
        y = height - bottom - t / highest * (height - bottom - top)
        d.line([left - 5, y, left, y], fill='black')
        d.text((left - 30, y - 6), f'{t:g}', fill='black')
    bar = (width - 20 - left) / 10
    for k in range(10):
        x0, name = left + k * bar + 4, decade_name(k)
        d.text((x0, height - bottom + 6), name, fill='black')
        if name in by_decade:
            y = height - bottom - by_decade[name]['rmse'] / highest * (height - bottom - top)
            d.rectangle([x0, y, x0 + bar - 8, height - bottom], fill=BLUE)
            d.text((x0, y - 14), f'n={by_decade[name]["n"]}', fill='black')
    d.text((left, 12), title, fill='black')
    d.text((left, 28), 'RMSE (years) by true age', fill='black')
    dataset.write_atomic(path, lambda tmp: im.save(tmp))


def plot_both(scatter_path, decades_path, age, pred, title):
    """The two pictures of a set of predictions: predicted against true age, and RMSE by decade."""
    plot_predictions(scatter_path, age, pred, title)
    plot_error_by_decade(decades_path, age, pred, title)


def report(scatter_path, decades_path, age, pred, title, log=print):
    """What every scored set of predictions gets (train.py's validation, cv.py's out-of-fold
    predictions, predict.py --labels): the two pictures and, in the log, the warning of a
    collapse. Returns the RMSE per decade of true age. Paths None: no pictures."""
    if scatter_path is not None:
        plot_both(scatter_path, decades_path, age, pred, title)
    warning = collapse_warning(age, pred)
    if warning:
        log(warning)
    return rmse_by_decade(age, pred)
