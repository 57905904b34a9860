"""Predict ages with one or more trained models: the Kaggle submission, or any photos.

    python predict.py --checkpoint runs/r50/best.pt --data data/wiki --out submission.csv
    python predict.py --checkpoint runs/cv-resnet50 --data data/wiki      # the CV run's fold models
    python predict.py --checkpoint a/best.pt b/best.pt --data data/wiki --no-tta  # two, no flip
    python predict.py --checkpoint runs/r50 --images me.jpg photos/        # your own photos
    python predict.py --checkpoint runs/r50 --images faces/ --labels faces/ages.csv  # score them
    python predict.py --checkpoint runs/demo-... --data data/demo --labels ANSWERS  # see below

--data writes one row per ID of wiki_judge.csv (or of sample_submission.csv when the download has
one), sorted by ID; a test image that is missing or unreadable still gets a row, the training mean
age, and a warning lists its ID. --images takes files and folders (walked recursively, sorted), in
any format Pillow reads, and writes path,age for every readable image; unreadable files are listed
as such. --labels also scores the predictions (RMSE, MAE, R^2 and RMSE per age decade, and two
plots beside --out): a CSV of file,age with --images, or of ID,age with --data (the demo's
demo_judge_answers.csv; Kaggle keeps the real test set's ages hidden).

Every image goes through the preprocessing of validation in train.py (grey, 100x100, the same
normalisation), and horizontal-flip test-time augmentation averages each face with its mirror
image. A photo is first turned upright by its EXIF orientation and centre-cropped to a square.

models.predict_ages is THE prediction path: train.py's validation and cv.py's out-of-fold
predictions call it too, so a checkpoint gives the same ages here as in the run that made it.
Every input (checkpoints, CSVs, images) is checked before the first output is written.
"""
import argparse
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

import cli
import dataset
import metrics
import models


# ----------------------------------------------------------------------------- the models

def load_model(path, device):
    """Rebuild a model from its checkpoint alone: (model on device, the checkpoint's other
    fields)."""
    ckpt = models.load_checkpoint(path)
    widths = models.cnn_widths(ckpt['model']) if ckpt['model_name'] == 'cnn' else None
    try:
        model = models.build_model(ckpt['model_name'], weights='none', bins=ckpt.get('bins', 0),
                                   widths=widths)
        model.load_state_dict(ckpt['model'])
    except (RuntimeError, ValueError) as e:  # no convolutions; missing or wrongly shaped tensors
        raise models.CheckpointError(f'{path}: its weights do not fit a {ckpt["model_name"]} '
                                     f'({str(e).splitlines()[-1].strip()[:200]})') from None
    return models.place(model, device), ckpt


def ensemble_ages(checkpoints, images, device, batch_size, tta, precision='fp32'):
    """Ages for every image (uint8 tensor (N, 100, 100)), the mean over the models; and the mean
    and sd of the models' training ages (the guess for a face that cannot be read, and the spread
    predictions should have)."""
    total, mean_age, sd_age = torch.zeros(len(images)), 0.0, 0.0
    for path in checkpoints:
        model, ckpt = load_model(path, device)
        total += models.predict_ages(model, images, np.arange(len(images)), ckpt['size'],
                                     ckpt['channels'],
                                     batch_size, device, tta=tta, precision=precision)
        mean_age += ckpt['y_mean'] / len(checkpoints)
        sd = ckpt.get('y_std')  # not needed to rebuild a model, so not checked on loading
        sd_age += sd / len(checkpoints) if isinstance(sd, float) and math.isfinite(sd) else 0.0
        print(f'{path}: {ckpt["model_name"]} at {ckpt["size"]} px, val RMSE '
              f'{ckpt.get("val_rmse", float("nan")):.3f}',
              flush=True)
    return (total / len(checkpoints)).numpy(), mean_age, sd_age


# ----------------------------------------------------------------------------- the command

def checkpoint_files(paths):
    """Expand run directories: a train.py run gives its best.pt, a cv.py run its fold models."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, 'best.pt')):
                files.append(os.path.join(path, 'best.pt'))
            elif os.path.exists(os.path.join(path, 'fold_models.csv')):
                listed = dataset.read_csv_strict(os.path.join(path, 'fold_models.csv'),
                                                 ['checkpoint'])['checkpoint']
                files += [os.path.join(path, f) for f in listed]
            else:
                raise dataset.DataError(f'{path}: neither best.pt (train.py) nor fold_models.csv '
                                        '(cv.py) is there')
        else:
            files.append(path)
    return files


def test_table(files, data_dir):
    """IDs and image files to predict: the judge CSV, restricted to sample_submission's IDs if
    present."""
    dataset.require(files, data_dir, 'judge', 'judge_images')
    judge = dataset.read_judge(files['judge'])
    if files['sample_submission']:
        ids = dataset.parse_id_column(dataset.read_csv_strict(files['sample_submission'], ['ID']),
                                      'ID',
                                      files['sample_submission'])
        judge = judge.set_index('ID').reindex(ids)
        no_file = judge['path'].isna()
        # Kaggle names them ID.png
        judge.loc[no_file, 'path'] = [f'{i}.png' for i in judge.index[no_file]]
        judge = judge.reset_index()
    return judge.sort_values('ID').reset_index(drop=True)


def kaggle_submission(args, files, checkpoints, device):
    """--data: one row of ID, age for each test ID; a missing or unreadable image gets the mean
    age."""
    judge = test_table(files, args.data)
    images, problems = dataset.decode_all([os.path.join(files['judge_images'],
                                                        p) for p in judge['path']])
    bad = np.array([not dataset.usable(p) for p in problems])
    age, mean_age, sd_age = ensemble_ages(checkpoints, torch.from_numpy(images), device,
                                          args.batch_size, not args.no_tta, args.precision)
    if bad.any():
        age[bad] = mean_age  # the RMSE-optimal guess without a picture
        print(f'warning: {int(bad.sum())} test image(s) missing or unreadable, predicted the '
              f'training mean {mean_age:.1f} for IDs {judge["ID"][bad].tolist()}', file=sys.stderr)
    warning = metrics.collapse_warning(None, age[~bad], truth_sd=sd_age) if sd_age > 0 else None
    if warning:
        print(warning, file=sys.stderr)
    return pd.DataFrame({'ID': judge['ID'], 'age': np.round(age, 4)})


def find_images(paths, skip=()):
    """Files named, and every file under the folders named (walked recursively, sorted), in the
    order given. Hidden files and `skip` (the labels CSV) are left out; anything else is tried as
    an image."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            walked = [os.path.join(root, f) for root, dirs, names in os.walk(path) for f in names
                      if not f.startswith('.')]
            found += sorted(p for p in walked if os.path.abspath(p) not in skip)
        elif os.path.exists(path):
            found.append(path)
        else:
            raise dataset.DataError(f'--images {path}: no such file or folder')
    unique = list(dict.fromkeys(found))
    if not unique:
        raise dataset.DataError(f'--images {" ".join(paths)}: no files there')
    return unique


def framing_hints(files, ok):
    """Photos that were probably not cropped to a face like the training crops."""
    hints = []
    for path in np.asarray(files)[ok]:
        size = dataset.image_size(path)
        if size and max(size) > 1.5 * min(size):
            hints.append(f'{path} is {size[0]}x{size[1]}, far from square: only its centre square '
                         'is used')
        elif size and min(size) > 4 * dataset.IMAGE_SIZE:
            hints.append(f'{path} is {size[0]}x{size[1]}, far larger than the 100x100 training '
                         'faces')
    return hints


def photo_predictions(args, files, checkpoints, device):
    """--images: the table of path, age for the readable files; the unreadable ones are listed."""
    print(f'{len(files)} file(s) to read', flush=True)
    images, problems = dataset.decode_all(files, photo=True)
    ok = np.array([dataset.usable(p) for p in problems])
    if not ok.any():
        raise dataset.DataError(f'--images {" ".join(args.images)}: none of the '
                                f'{len(files)} file(s) can be read as an image (first: {files[0]}: '
                                f'{problems[0]})')
    age = np.full(len(files), np.nan)
    age[ok], *_ = ensemble_ages(checkpoints, torch.from_numpy(images[ok]), device, args.batch_size,
                                not args.no_tta, args.precision)
    width = max(len(f) for f in files)
    print(f'\n{"file":<{width}}  age')
    for path, a, problem in zip(files, age, problems):
        print(f'{path:<{width}}  {a:5.1f}' if np.isfinite(a) else f'{path:<{width}}  unreadable '
                                                                  f'({problem})')
    hints = framing_hints(files, ok)
    if hints:
        print('\nhint: these look uncropped; ages are best for faces framed like the training '
              'crops (README, "Your own photos"):\n  ' + '\n  '.join(hints))
    unreadable = [f for f, good in zip(files, ok) if not good]
    if unreadable:
        print(f'warning: {len(unreadable)} file(s) could not be read as images and are not in the '
              'CSV: '
              + ', '.join(unreadable), file=sys.stderr)
    return pd.DataFrame({'path': np.asarray(files)[ok], 'age': np.round(age[ok], 4)})


def read_age_labels(path, key):
    """--labels: the CSV of key (file or ID), age, read and checked before anything is predicted
    or written."""
    labels = dataset.read_csv_strict(path, [key, 'age'])
    if key == 'ID':
        labels = labels.assign(ID=dataset.parse_id_column(labels, 'ID', path))
    return labels.assign(age=dataset.parse_column(labels, 'age', path, allow_nan=False, low=0,
                                                  high=dataset.MAX_AGE))


def match_ids(args, labels, table):
    """--data with --labels: (true ages, predicted ages) of the test IDs the labels hold."""
    pred = table.set_index('ID')['age']
    found = labels['ID'].isin(pred.index).to_numpy()
    if not found.any():
        raise dataset.DataError(f'{args.labels}: none of its IDs is a test ID of {args.data}')
    missed = labels['ID'][~found].tolist()
    print(f'\nlabels: {int(found.sum())} of {len(labels)} labelled ID(s) predicted'
          + (f', {len(missed)} not in the test set (IDs {missed[:10]})' if missed else ''))
    return labels['age'].to_numpy()[found], pred.loc[labels['ID'][found]].to_numpy()


def match_labels(args, labels, table):
    """(true ages, predicted ages) of the labelled files that were read. A name is relative to an
    --images folder or to the labels file's folder, or absolute. None found is an error."""
    folders = [p for p in args.images if os.path.isdir(p)]
    folders.append(os.path.dirname(os.path.abspath(args.labels)))
    where = {os.path.abspath(p): i for i, p in enumerate(table['path'])}
    found, truth, missed = [], [], []
    for name, age in zip(labels['file'], labels['age']):
        candidates = [name] if os.path.isabs(name) else [os.path.join(f, name) for f in folders]
        row = next((where[os.path.abspath(c)] for c in candidates if os.path.abspath(c) in where),
                   None)
        if row is None:
            missed.append(name)
        else:
            found.append(row)
            truth.append(age)
    if not found:
        raise dataset.DataError(f'{args.labels}: none of its files is among the images read; file '
                                'names are relative to the --images folder or to the labels file, '
                                'or absolute')
    print(f'\nlabels: {len(found)} of {len(labels)} labelled image(s) found and predicted, '
          f'{len(missed)} missed'
          + (' (not found or unreadable: '
             f'{", ".join(missed[:10])}{" ..." if len(missed) > 10 else ""})'
             if missed else ''))
    return np.asarray(truth), table['age'].to_numpy()[found]


def report_labels(labels_path, truth, pred, out):
    """RMSE, MAE, R^2 and RMSE per decade of the labelled images; the two plots beside `out`."""
    m = metrics.scores(truth, pred)
    print(f'RMSE {m["rmse"]:.3f}  MAE {m["mae"]:.3f}  R^2 {m["r2"]:.3f}  (n={m["n"]})')
    stem = os.path.splitext(out)[0]
    by_decade = metrics.report(f'{stem}_vs_actual.png', f'{stem}_by_decade.png', truth, pred,
                               f'{os.path.basename(labels_path)}, {len(truth)} labelled images')
    print('RMSE by decade of the true age: ' + ', '.join(
        f'{name} {v["rmse"]:.1f} (n={v["n"]})' for name, v in by_decade.items()))
    print(f'wrote {stem}_vs_actual.png and {stem}_by_decade.png')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument('--checkpoint', nargs='+', required=True,
                        help='best.pt files or run directories')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--data', help='Kaggle folder with wiki_judge.csv and wiki_judge_images/: '
                                       'the submission')
    source.add_argument('--images', nargs='+', metavar='PATH',
                        help='image files and folders: path,age for each')
    parser.add_argument('--labels', metavar='CSV',
                        help='true ages to score the predictions: a CSV of file,age with --images, '
                             'of ID,age with --data')
    parser.add_argument('--out', help='the CSV to write (default: submission.csv with --data, '
                                      'predictions.csv with --images)')
    parser.add_argument('--batch-size', type=cli.number(int, at_least=1), default=256,
                        help='images per forward pass')
    parser.add_argument('--no-tta', action='store_true',
                        help='no horizontal-flip test-time augmentation')
    cli.add_device(parser)
    cli.add_precision(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or ('submission.csv' if args.data else 'predictions.csv')

    def work():
        device = models.pick_device(args.device)
        args.precision, why = models.choose_precision(args.precision, device)
        print(f'predicting on {device} in {args.precision} ({why})', flush=True)
        checkpoints = checkpoint_files(args.checkpoint)
        labels = read_age_labels(args.labels,
                                 'ID' if args.data else 'file') if args.labels else None
        if args.data:
            files = dataset.find_files(args.data)
            inputs = [files['judge'], files['sample_submission'], args.labels]
        else:
            photos = find_images(args.images,
                                 skip={os.path.abspath(args.labels)} if args.labels else set())
            inputs = photos + [args.labels]
        stem = os.path.splitext(out)[0]
        for written in [out] + ([f'{stem}_vs_actual.png',
                                 f'{stem}_by_decade.png'] if labels is not None else []):
            cli.refuse_overwriting_inputs(parser, '--out', written, inputs + checkpoints)
        if args.data:
            table = kaggle_submission(args, files, checkpoints, device)
        else:
            table = photo_predictions(args, photos, checkpoints, device)
        scored = None
        if labels is not None:
            scored = (match_ids if args.data else match_labels)(args, labels, table)
        dataset.write_csv(table, out)  # every input is checked: now the outputs
        print(f'wrote {len(table)} rows to {out} (mean age {table["age"].mean():.1f}, '
              f'{len(checkpoints)} model(s), flip TTA {"off" if args.no_tta else "on"})')
        if scored is not None:
            report_labels(args.labels, *scored, out)
    return cli.run(work, batch_size=args.batch_size)


if __name__ == '__main__':
    sys.exit(main())
