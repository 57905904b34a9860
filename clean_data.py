"""Filter wiki_labels.csv into the clean CSV that train.py and cv.py read.

    python clean_data.py --data data/wiki                       # writes data/wiki/wiki_labels_clean.csv
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
"""
import argparse
import math
import os
import sys

import numpy as np

import dataset


def metadata_rules(table, min_face_score=None, drop_second_face=False, min_age=1.0, max_age=100.0):
    """{rule: rows it rejects} for the rules that need no image. Also used by train.py and cv.py to
    filter the TRAINING part of a split, never the validation part."""
    face = table['face_score'].to_numpy(dtype=float)
    age = table['age'].to_numpy(dtype=float)
    rules = {}
    if min_face_score is not None and min_face_score > -math.inf:
        rules[f'face_score not a number or < {min_face_score:g}'] = ~(face >= min_face_score)
    if drop_second_face:
        rules['second face detected'] = np.isfinite(table['second_face_score'].to_numpy(dtype=float))
    rules[f'age outside {min_age:g}..{max_age:g}'] = ~((age >= min_age) & (age <= max_age))
    return rules


def test_like(table):
    """Rows like the Kaggle test set's, which validation scores: a face was found (the test set's
    1,409 rows have 10 without one), any face score, second faces included, and a possible age
    (1..100; a CSV cleaned with wider --min-age/--max-age keeps the others for training only)."""
    age = table['age'].to_numpy(dtype=float)
    return np.isfinite(table['face_score'].to_numpy(dtype=float)) & (age >= 1) & (age <= 100)


def clean_only(table):
    """The rows the old cleaning kept (face score >= 1, no second face): validation also reports
    them, for comparison with earlier numbers."""
    face = table['face_score'].to_numpy(dtype=float)
    return (face >= 1) & ~np.isfinite(table['second_face_score'].to_numpy(dtype=float))


def clean(table, image_root, args, log=print):
    """Apply the rules in order. Returns (kept table, decoded images of the kept rows, report rows)."""
    keep = np.ones(len(table), dtype=bool)
    report = [('rows in wiki_labels.csv', 0, len(table))]
    images = None
    if not args.no_image_check:
        paths = [os.path.join(image_root, p) for p in table['path']]
        log(f'decoding {len(paths)} images from {image_root} ...')
        images, problems = dataset.decode_all(paths)
        bad = np.array([not dataset.usable(p) for p in problems])
        removed = int((keep & bad).sum())
        keep &= ~bad
        report.append(('image missing or does not decode', removed, int(keep.sum())))
        for kind, listed in (('unreadable', bad), ('converted', np.array([bool(p) and p.startswith('converted')
                                                                           for p in problems]))):
            rows = np.flatnonzero(listed)
            if len(rows):
                log(f'{len(rows)} image(s) {kind}' + (' (kept, converted to 100x100 grey)' if kind == 'converted' else ''))
                for i in rows[:10]:
                    log(f'  ID {table["ID"].iat[i]}: {table["path"].iat[i]}: {problems[i]}')
                if len(rows) > 10:
                    log(f'  ... and {len(rows) - 10} more')
    for rule, bad in metadata_rules(table, args.min_face_score, args.drop_second_face,
                                    args.min_age, args.max_age).items():
        removed = int((keep & bad).sum())
        keep &= ~bad
        report.append((rule, removed, int(keep.sum())))
    kept = table[keep].reset_index(drop=True)
    return kept, (images[keep] if images is not None else None), report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=dataset.HelpFormatter)
    parser.add_argument('--data', required=True, help='folder with wiki_labels.csv and wiki_labeled/')
    parser.add_argument('--out', help='clean CSV to write (default: DATA/wiki_labels_clean.csv)')
    parser.add_argument('--min-face-score', type=float,
                        help='also drop rows whose face detector score is below this (#NAME? = no face = -inf); '
                             'by default they stay, and train.py decides what it trains on')
    parser.add_argument('--drop-second-face', action='store_true',
                        help='also drop rows where a second face was detected')
    parser.add_argument('--min-age', type=float, default=1.0, help='drop younger labels (0 = photo before birth)')
    parser.add_argument('--max-age', type=float, default=100.0, help='drop older labels (nonsense birth dates)')
    parser.add_argument('--no-image-check', action='store_true',
                        help='do not open the images (faster; unreadable ones are then skipped at training)')
    args = parser.parse_args(argv)
    if args.min_age > args.max_age:
        parser.error(f'--min-age {args.min_age:g} is above --max-age {args.max_age:g}')
    out = args.out or os.path.join(args.data, 'wiki_labels_clean.csv')
    try:
        files = dataset.find_files(args.data)
        dataset.require(files, args.data, 'labels', 'images')
        table = dataset.read_labels(files['labels'])
        kept, images, report = clean(table, files['images'], args)
    except dataset.DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    try:
        dataset.write_csv(kept[dataset.CLEAN_COLUMNS], out)
    except OSError as e:
        print(f'error: cannot write {out}: {e.strerror or e}; choose another place with --out', file=sys.stderr)
        return 1
    if images is not None:  # the kept rows are decoded already: cache them for train.py
        dataset.save_cache(out, list(kept['path']), images, np.ones(len(kept), bool))

    width = max(len(r[0]) for r in report)
    print(f'\n{"rule":<{width}}  {"removed":>8}  {"left":>8}')
    for rule, removed, left in report:
        print(f'{rule:<{width}}  {removed if rule != report[0][0] else "":>8}  {left:>8}')
    gender = kept['gender']
    print(f'\nkept {len(kept)} of {len(table)} rows from {kept["person"].nunique()} people; gender: '
          f'{int((gender == 1).sum())} male, {int((gender == 0).sum())} female, '
          f'{int(gender.isna().sum())} unknown (kept)')
    print(f'test-like rows (a face found, which validation scores): {int(test_like(kept).sum())}; of those '
          f'with face score >= 1 and no second face (the old cleaning): {int(clean_only(kept).sum())}')
    print(f'age: mean {kept["age"].mean():.1f}, std {kept["age"].std():.1f}, '
          f'min {kept["age"].min():.1f}, max {kept["age"].max():.1f}')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
