"""Filter wiki_labels.csv into the clean CSV that train.py and cv.py read.

    python clean_data.py --data data/wiki                       # data/wiki/wiki_labels_clean.csv
    python clean_data.py --data data/wiki --out /tmp/clean.csv  # when the data folder is read-only
    python clean_data.py --data data/wiki --min-face-score 1    # also drop weak or missing faces

By default it removes only what is unusable anywhere: a missing or undecodable image, an
impossible age. Face score and second faces are training choices, not cleaning: the Kaggle test
set keeps such faces (8% of its rows have a second face), so validation keeps every row where a
face was found ("test-like"), and train.py's --train-min-face-score and --train-keep-second-face
decide which rows it learns from. Every image is opened and decoded (not just looked up); the
decoded faces of the kept rows are cached next to the output CSV, so training starts in seconds.
Each rule reports how many rows it removed. Rows with unknown gender are kept: they are valid age
samples. Gender balancing is NOT done here: balancing before the train/validation split copies
images into validation (see train.py --balance-gender).

The rows a run uses are chosen here too, beside the rules they apply: `training_rows` (the
--train-* filters, training part only), `validation_rows` (the test-like rows of a fold),
`person_folds` (cv.py's folds, no person in two) and `split` (train.py's).
"""
import argparse
import dataclasses
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

import cli
import dataset


def metadata_rules(table, min_face_score=None, drop_second_face=False, min_age=dataset.AGE_RANGE[0],
                   max_age=dataset.AGE_RANGE[1]):
    """{rule: rows it rejects} for the rules that need no image. Also used by train.py and cv.py to
    filter the TRAINING part of a split, never the validation part."""
    face = table['face_score'].to_numpy(dtype=float)
    age = table['age'].to_numpy(dtype=float)
    rules = {}
    if min_face_score is not None and min_face_score > -math.inf:
        rules[f'face_score not a number or < {min_face_score:g}'] = ~(face >= min_face_score)
    if drop_second_face:
        second = table['second_face_score'].to_numpy(dtype=float)
        rules['second face detected'] = np.isfinite(second)
    rules[f'age outside {min_age:g}..{max_age:g}'] = ~((age >= min_age) & (age <= max_age))
    return rules


TEST_LIKE = f'a face found, an age in {dataset.AGE_RANGE[0]:g}..{dataset.AGE_RANGE[1]:g}'


def test_like(table):
    """Rows like the Kaggle test set's, which validation scores: a face was found (the test set's
    1,409 rows have 10 without one), any face score, second faces included, and a possible age
    (dataset.AGE_RANGE; a CSV cleaned with wider --min-age/--max-age keeps the others for training
    only)."""
    age = table['age'].to_numpy(dtype=float)
    low, high = dataset.AGE_RANGE
    return np.isfinite(table['face_score'].to_numpy(dtype=float)) & (age >= low) & (age <= high)


def clean_only(table):
    """The rows the old cleaning kept (face score >= 1, no second face): validation also reports
    them, for comparison with earlier numbers."""
    face = table['face_score'].to_numpy(dtype=float)
    return (face >= 1) & ~np.isfinite(table['second_face_score'].to_numpy(dtype=float))


def clean(table, image_root, args, log=print):
    """Apply the rules in order. Returns (kept table, decoded images of the kept rows, report
    rows)."""
    keep = np.ones(len(table), dtype=bool)
    report = [('rows in wiki_labels.csv', 0, len(table))]

    def apply(rule, bad):
        report.append((rule, int((keep & bad).sum()), int((keep & ~bad).sum())))
        return keep & ~bad

    outside = np.array([dataset.outside(p) for p in table['path']], dtype=bool)
    if outside.any():  # an absolute path or '..': never opened (it could point at a test image)
        list_rows(table, outside, 'with a path outside the image folder (removed, not opened)',
                  [None] * len(table), log)
        keep = apply('image path outside wiki_labeled/', outside)
    images = None
    if not args.no_image_check:
        opened = np.flatnonzero(keep)
        log(f'decoding {len(opened)} images from {image_root} ...')
        images, decoded = dataset.decode_all([os.path.join(image_root,
                                                           table['path'].iat[i]) for i in opened])
        problems = np.full(len(table), None, dtype=object)
        problems[opened] = decoded
        bad = np.array([not dataset.usable(p) for p in problems])
        list_rows(table, bad, 'unreadable', problems, log)
        list_rows(table, np.array([bool(p) and p.startswith('converted') for p in problems]),
                  'converted (kept, converted to 100x100 grey)', problems, log)
        keep = apply('image missing or does not decode', bad)
    for rule, bad in metadata_rules(table, args.min_face_score, args.drop_second_face,
                                    args.min_age, args.max_age).items():
        keep = apply(rule, bad)
    if images is not None:  # the decoded faces of the kept rows, in their order
        images = images[np.searchsorted(opened, np.flatnonzero(keep))]
    return table[keep].reset_index(drop=True), images, report


def list_rows(table, rows, kind, problems, log):
    """Log the rows a rule flagged: how many, and the first ten with their file and problem."""
    rows = np.flatnonzero(rows)
    if len(rows):
        log(f'{len(rows)} image(s) {kind}')
        for i in rows[:10]:
            problem = f': {problems[i]}' if problems[i] else ''
            log(f'  ID {table["ID"].iat[i]}: {table["path"].iat[i]}{problem}')
        if len(rows) > 10:
            log(f'  ... and {len(rows) - 10} more')


# ----------------------------------------------------------------------------- the rows a run uses

def training_rows(table, rows, args, where='the training part'):
    """The training part of a split, filtered by the --train-* options (validation never is). Fewer
    than 2 rows left is an error that says what each filter removed."""
    rules = metadata_rules(
        table.iloc[rows], min_face_score=args.train_min_face_score,
        drop_second_face=not args.train_keep_second_face,
        min_age=-math.inf if args.train_min_age is None else args.train_min_age,
        max_age=math.inf if args.train_max_age is None else args.train_max_age)
    bad = np.zeros(len(rows), dtype=bool)
    for mask in rules.values():
        bad |= mask
    if (~bad).sum() < 2:
        removed = ', '.join(f'{rule}: {int(mask.sum())}' for rule, mask in rules.items())
        raise dataset.DataError(f'{where} has {len(rows)} rows and {int((~bad).sum())} pass the '
                                f'training filters ({removed}); see --train-min-face-score, '
                                '--train-keep-second-face, --train-min-age, --train-max-age')
    return rows[~bad]


def validation_rows(table, folds, k):
    """Fold k's test-like rows (a face found, a possible age): what validation scores. Rows without
    a face are in no validation set, as the test set has almost none."""
    return np.flatnonzero((folds == k) & test_like(table))


def person_folds(person, age, k, seed):
    """Fold number for every row: no person in two folds, each fold with a similar age mix and size.

    Persons are sorted by their median age and dealt out in blocks of k (after a seeded shuffle,
    so equal ages break ties at random); inside a block the biggest person goes to the smallest
    fold. Grouping matters because the same face in train and validation makes validation lie."""
    frame = pd.DataFrame({'person': np.asarray(person), 'age': np.asarray(age, dtype=float)})
    groups = frame.groupby('person', sort=True)['age'].agg(['median', 'size'])
    rng = np.random.default_rng(seed)
    groups['tie'] = rng.permutation(len(groups))
    groups = groups.sort_values(['median', 'tie'])
    fold_of = {}
    fold_size = np.zeros(k, dtype=np.int64)
    names, sizes = groups.index.to_numpy(), groups['size'].to_numpy()
    for start in range(0, len(groups), k):
        block = sorted(range(start, min(start + k, len(groups))), key=lambda i: -sizes[i])
        free = sorted(range(k), key=lambda f: (fold_size[f], rng.random()))
        for i, f in zip(block, free):
            fold_of[names[i]] = f
            fold_size[f] += sizes[i]
    return frame['person'].map(fold_of).to_numpy(dtype=np.int64)


def split(args, table):
    """(training rows, validation rows): a person-grouped share of 1/round(1/val_frac) validates
    on its test-like rows, the rest trains through the --train-* filters. --val-frac 0: all
    train."""
    if args.val_frac:
        folds = person_folds(table['person'], table['age'], max(2, round(1 / args.val_frac)),
                             args.seed)
    else:  # the final model: every row trains, nothing validates
        folds = np.ones(len(table), dtype=np.int64)
    val_rows = validation_rows(table, folds, 0)
    train_rows = training_rows(table, np.flatnonzero(folds != 0), args)
    if args.val_frac and len(val_rows) < 1:
        raise dataset.DataError(f'no validation rows: the validation share of {len(table)} rows '
                                f'({table["person"].nunique()} people) holds no test-like row '
                                f'({TEST_LIKE})')
    return train_rows, val_rows


@dataclasses.dataclass
class Rows:
    """What a run trains on and scores: the whole image array and positions of rows in it."""
    images: torch.Tensor         # uint8 (N, 100, 100), on the device when it fits
    ages: torch.Tensor           # float32 years of the N rows, next to the images
    train: torch.Tensor          # positions of the training rows
    val: np.ndarray              # positions of the validation rows (test-like)
    val_ages: np.ndarray         # their true ages, in float64 as the CSV has them
    val_ids: np.ndarray
    val_clean: np.ndarray        # which of them pass the old cleaning (clean_only)
    draw_weights: torch.Tensor   # --balance-gender: each training row's weight, else None
    age_mean: float              # of the training rows: the model learns (age - mean) / std
    age_std: float


def make_rows(args, images, table, train_rows, val_rows):
    """The Rows of a split: images, the clean table of the same rows, and the two parts'
    positions."""
    ages = torch.tensor(table['age'].to_numpy(dtype=np.float32)).to(images.device)
    train_rows = torch.as_tensor(train_rows)
    train_ages = ages[train_rows.to(ages.device)]
    val_rows = np.asarray(val_rows, dtype=np.int64)
    weights = None
    if args.balance_gender:
        weights = draw_weights(table['gender'].to_numpy()[train_rows.numpy()])
    return Rows(images=images, ages=ages, train=train_rows, val=val_rows,
                val_ages=table['age'].to_numpy()[val_rows],
                val_ids=table['ID'].to_numpy()[val_rows],
                val_clean=clean_only(table.iloc[val_rows]), draw_weights=weights,
                age_mean=float(train_ages.mean()),
                age_std=float(train_ages.std()) if len(train_rows) > 1 else 1.0)


def draw_weights(gender):
    """--balance-gender: male and female rows get equal total weight; unknown keeps its share."""
    gender = np.asarray(gender, dtype=float)
    w = np.ones(len(gender))
    male, female = gender == 1, gender == 0
    known = male.sum() + female.sum()
    if male.any() and female.any():
        w[male] = known / 2 / male.sum()
        w[female] = known / 2 / female.sum()
    return torch.from_numpy(w)


def print_report(report, kept, table, out):
    width = max(len(r[0]) for r in report)
    print(f'\n{"rule":<{width}}  {"removed":>8}  {"left":>8}')
    for rule, removed, left in report:
        print(f'{rule:<{width}}  {removed if rule != report[0][0] else "":>8}  {left:>8}')
    gender = kept['gender']
    print(f'\nkept {len(kept)} of {len(table)} rows from {kept["person"].nunique()} people; '
          f'gender: {int((gender == 1).sum())} male, {int((gender == 0).sum())} female, '
          f'{int(gender.isna().sum())} unknown (kept)')
    print(f'test-like rows (a face found, which validation scores): {int(test_like(kept).sum())}; '
          'of those with face score >= 1 and no second face (the old cleaning): '
          f'{int(clean_only(kept).sum())}')
    print(f'age: mean {kept["age"].mean():.1f}, std {kept["age"].std():.1f}, '
          f'min {kept["age"].min():.1f}, max {kept["age"].max():.1f}')
    print(f'wrote {out}')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument('--data', required=True,
                        help='folder with wiki_labels.csv and wiki_labeled/')
    parser.add_argument('--out', help='clean CSV to write (default: DATA/wiki_labels_clean.csv)')
    parser.add_argument('--min-face-score', type=cli.number(minus_infinity=True),
                        help='also drop rows whose face detector score is below this (#NAME? = no '
                             'face = -inf); by default they stay, and train.py decides what it '
                             'trains on')
    parser.add_argument('--drop-second-face', action='store_true',
                        help='also drop rows where a second face was detected')
    parser.add_argument('--min-age', type=cli.number(), default=dataset.AGE_RANGE[0],
                        help='drop younger labels (0 = photo before birth)')
    parser.add_argument('--max-age', type=cli.number(), default=dataset.AGE_RANGE[1],
                        help='drop older labels (nonsense birth dates)')
    parser.add_argument('--no-image-check', action='store_true',
                        help='do not open the images (faster; unreadable ones are then skipped at '
                             'training)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_age > args.max_age:
        parser.error(f'--min-age {args.min_age:g} is above --max-age {args.max_age:g}')
    out = args.out or os.path.join(args.data, 'wiki_labels_clean.csv')

    def work():
        files = dataset.find_files(args.data)
        dataset.require(files, args.data, 'labels', 'images')
        cli.refuse_overwriting_inputs(parser, '--out', out,
                                      [files['labels'], files['judge'], files['sample_submission']])
        table = dataset.read_labels(files['labels'])
        kept, images, report = clean(table, files['images'], args)
        if len(kept) == 0:
            rule, removed, _ = max(report[1:], key=lambda r: r[1])
            raise dataset.DataError(f'no usable rows: all {len(table)} rows of '
                                    f'{files["labels"]} were removed (most by "{rule}": '
                                    f'{removed}); the images were looked for in {files["images"]}')
        dataset.write_csv(kept[dataset.CLEAN_COLUMNS], out)
        if images is not None:  # the kept rows are decoded already: cache them for train.py
            dataset.save_cache(out, list(kept['path']), images, np.ones(len(kept), bool))
        print_report(report, kept, table, out)
    return cli.run(work)


if __name__ == '__main__':
    sys.exit(main())
