"""Predict ages with one or more trained models: the Kaggle submission, or any photos.

    python predict.py --checkpoint runs/r50/best.pt --data data/wiki --out submission.csv
    python predict.py --checkpoint runs/cv-resnet50 --data data/wiki      # the CV run's fold models
    python predict.py --checkpoint a/best.pt b/best.pt --data data/wiki --no-tta  # two, no flip
    python predict.py --checkpoint runs/r50 --images me.jpg photos/        # your own photos
    python predict.py --checkpoint runs/r50 --images holiday/ --find-face  # ... their faces found
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
image. A photo is first turned upright by its EXIF orientation and centre-cropped to a square, or
with --find-face cropped around its face as the training crops are framed (the optional face
finder: pip install --no-deps -r requirements-faces.txt).

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
from PIL import Image

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
    """--images: the table of path, age (and with --find-face what was done) for every face of
    the readable files; the unreadable ones are listed."""
    print(f'{len(files)} file(s) to read' + (', finding faces' if args.find_face else ''),
          flush=True)
    if args.find_face:
        rows = framed_faces(files, face_finder(), args.all_faces)
    else:
        images, problems = dataset.decode_all(files, photo=True)
        rows = [(f, image if dataset.usable(p) else None, '' if dataset.usable(p) else p)
                for f, image, p in zip(files, images, problems)]
    ok = np.array([image is not None for _, image, _ in rows])
    if not ok.any():
        raise dataset.DataError(f'--images {" ".join(args.images)}: none of the '
                                f'{len(files)} file(s) can be read as an image (first: {files[0]}: '
                                f'{rows[0][2]})')
    age = np.full(len(rows), np.nan)
    faces = torch.from_numpy(np.stack([image for _, image, _ in rows if image is not None]))
    age[ok], *_ = ensemble_ages(checkpoints, faces, device, args.batch_size, not args.no_tta,
                                args.precision)
    width = max(len(f) for f in files)
    print(f'\n{"file":<{width}}  age')
    for (path, _, what), a in zip(rows, age):
        print(f'{path:<{width}}  {a:5.1f}  {what}'.rstrip() if np.isfinite(a) else
              f'{path:<{width}}  {what}')  # 'missing' or 'unreadable: why'
    hints = [] if args.find_face else framing_hints(files, ok)
    if hints:
        print('\nhint: these look uncropped; ages are best for faces framed like the training '
              'crops (--find-face does it; README, "Your own photos"):\n  ' + '\n  '.join(hints))
    unreadable = [f for (f, _, _), good in zip(rows, ok) if not good]
    if unreadable:
        print(f'warning: {len(unreadable)} file(s) could not be read as images and are not in the '
              'CSV: ' + ', '.join(unreadable), file=sys.stderr)
    table = pd.DataFrame({'path': [r[0] for r in rows], 'age': np.round(age, 4),
                          'face': [r[2] for r in rows]})[ok]
    return table if args.find_face else table.drop(columns='face')


# ----------------------------------------------------------------------------- finding the face

# Where the face finder (MTCNN) puts the face in the training crops, as shares of the crop's side:
# its box's width and height and its centre (RESULTS.md, Framing). --find-face crops a photo so
# that its face sits the same way.
FACE_BOX = {'width': 0.540, 'height': 0.705, 'centre_x': 0.497, 'centre_y': 0.460}
DETECT_SIDE = 1600  # px: larger photos are searched at this size (the boxes scaled back)
FACES_EXTRA = 'pip install --no-deps -r requirements-faces.txt'


def face_finder():
    """MTCNN (facenet-pytorch, its weights inside the wheel: nothing is downloaded) as a function
    of an RGB image -> [(probability, (x0, y0, x1, y1))], the most probable face first."""
    try:
        from facenet_pytorch import MTCNN  # the optional extra, not a run-time requirement
    except ImportError as e:
        raise dataset.UserError(f'--find-face needs the face finder, which is not installed '
                                f'({e}); install it with: {FACES_EXTRA}') from None
    mtcnn = MTCNN(device='cpu', keep_all=True)

    def find(rgb):
        boxes, probs = mtcnn.detect(rgb)
        if boxes is None:
            return []
        found = zip(np.asarray(probs, float), np.asarray(boxes, float).tolist())
        return sorted(((p, tuple(b)) for p, b in found), key=lambda f: -f[0])
    return find


def framed_faces(files, find, all_faces=False):
    """--find-face: [(path, face as a 100x100 uint8 array or None, what was done or the problem)]:
    each photo upright, its most probable face (every face with all_faces) cropped to a square
    framed as the training crops are (face_square), or its centre square when none is found."""
    rows = []
    for path in files:
        try:
            im, note = dataset.open_image(path, photo=True)
        except FileNotFoundError:
            rows.append((path, None, 'missing'))
            continue
        except (OSError, SyntaxError, ValueError) as e:
            rows.append((path, None, f'unreadable: {type(e).__name__}: {e}'.strip()))
            continue
        with im:
            found = find_in(find, im)
            if not found:
                rows.append((path, dataset.face_array(im.crop(dataset.centre_square(im.size)),
                                                      note)[0], 'no face found: centre crop'))
            for p, (x0, y0, x1, y1) in found if all_faces else found[:1]:
                face = dataset.face_array(im.crop(face_square((x0, y0, x1, y1))), [])[0]
                where = f'{x0:.0f},{y0:.0f},{x1 - x0:.0f},{y1 - y0:.0f}'
                rows.append((path, face, f'found face {p:.2f} at {where}'))
    return rows


def find_in(find, im):
    """The faces `find` sees in a PIL image of any mode, searched at most DETECT_SIDE px wide."""
    rgb = dataset.to_8bit(im).convert('RGB')
    shrink = max(1.0, max(rgb.size) / DETECT_SIDE)
    if shrink > 1:
        rgb = rgb.resize((round(rgb.width / shrink), round(rgb.height / shrink)), Image.BILINEAR)
    return [(p, tuple(v * shrink for v in box)) for p, box in find(rgb)]


def face_square(box):
    """The square (left, top, right, bottom) around a face box (x0, y0, x1, y1) in which the face
    sits as in the training crops (FACE_BOX); parts beyond the photo come out black."""
    x0, y0, x1, y1 = box
    side = ((x1 - x0) / FACE_BOX['width'] + (y1 - y0) / FACE_BOX['height']) / 2
    left = (x0 + x1) / 2 - FACE_BOX['centre_x'] * side
    top = (y0 + y1) / 2 - FACE_BOX['centre_y'] * side
    return tuple(round(v) for v in (left, top, left + side, top + side))


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
    plots = plot_paths(out)
    by_decade = metrics.report(*(plots or (None, None)), truth, pred,
                               f'{os.path.basename(labels_path)}, {len(truth)} labelled images')
    print('RMSE by decade of the true age: ' + ', '.join(
        f'{name} {v["rmse"]:.1f} (n={v["n"]})' for name, v in by_decade.items()))
    print(f'wrote {plots[0]} and {plots[1]}' if plots else
          f'no plots: --out {out} is not a file to put them beside')


def plot_paths(out):
    """The two plots of --labels beside --out (OUT_vs_actual.png, OUT_by_decade.png); None when
    --out is not a regular file (/dev/null, a pipe), which has no folder to put them beside."""
    if os.path.exists(out) and not os.path.isfile(out):
        return None
    stem = os.path.splitext(out)[0]
    return f'{stem}_vs_actual.png', f'{stem}_by_decade.png'


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument('--checkpoint', nargs='+', required=True,
                        help='best.pt files or run directories')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--data', help='Kaggle folder with wiki_judge.csv and wiki_judge_images/: '
                                       'the submission')
    source.add_argument('--images', nargs='+', metavar='PATH',
                        help='image files and folders: path,age for each')
    parser.add_argument('--find-face', action='store_true',
                        help='with --images: find the face in each photo and crop it as the '
                             f'training crops are framed (needs the optional extra: {FACES_EXTRA})')
    parser.add_argument('--all-faces', action='store_true',
                        help='with --find-face: a row for every face found, not only the most '
                             'probable one')
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
    if args.find_face and not args.images:
        parser.error('--find-face works on --images (the Kaggle crops are faces already)')
    if args.all_faces and not args.find_face:
        parser.error('--all-faces needs --find-face')
    if args.all_faces and args.labels:
        parser.error('--labels scores one face a photo: leave out --all-faces')
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
        plots = (plot_paths(out) or ()) if labels is not None else ()
        for written in (out, *plots):
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
