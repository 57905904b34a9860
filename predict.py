"""Write the Kaggle submission: ID,age for every test image, averaged over one or more models.

    python predict.py --checkpoint runs/r50/best.pt --data data/wiki --out submission.csv
    python predict.py --checkpoint runs/cv-resnet50 --data data/wiki       # the CV run's fold models
    python predict.py --checkpoint a/best.pt b/best.pt --no-tta            # average two runs, no flip

One row per ID of wiki_judge.csv (or of sample_submission.csv when the download has one), sorted
by ID. Each image goes through the same preprocessing as validation in train.py; horizontal-flip
test-time augmentation averages each face with its mirror image. A test image that is missing or
unreadable still gets a row: the training mean age, and a warning lists its ID.
"""
import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch

import dataset
import models
import train


def checkpoint_files(paths):
    """Expand run directories: a train.py run gives its best.pt, a cv.py run its fold models."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, 'best.pt')):
                files.append(os.path.join(path, 'best.pt'))
            elif os.path.exists(os.path.join(path, 'fold_models.csv')):
                listed = dataset.read_csv_strict(os.path.join(path, 'fold_models.csv'), ['checkpoint'])['checkpoint']
                files += [os.path.join(path, f) for f in listed]
            else:
                raise dataset.DataError(f'{path}: neither best.pt (train.py) nor fold_models.csv (cv.py) is there')
        else:
            files.append(path)
    return files


def load_model(path, device):
    """Rebuild a model from a checkpoint alone (weights_only: nothing in the file can run code)."""
    ckpt = train.load_checkpoint(path)
    for key in ('model', 'model_name', 'size', 'channels'):
        if key not in ckpt:
            raise train.CheckpointError(f'{path}: not a checkpoint of this project (no {key!r})')
    if ckpt['model_name'] not in models.MODELS:
        raise train.CheckpointError(f'{path}: unknown model {ckpt["model_name"]!r}')
    model = models.build_model(ckpt['model_name'], weights='none')
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # missing, unexpected or wrongly shaped tensors
        raise train.CheckpointError(f'{path}: its weights do not fit a {ckpt["model_name"]} '
                                    f'({str(e).splitlines()[-1].strip()[:200]})') from None
    model = model.to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def test_table(files, data_dir):
    """IDs and image files to predict: the judge CSV, restricted to sample_submission's IDs if present."""
    dataset.require(files, data_dir, 'judge', 'judge_images')
    judge = dataset.read_judge(files['judge'])
    if files['sample_submission']:
        ids = dataset.parse_id_column(dataset.read_csv_strict(files['sample_submission'], ['ID']), 'ID',
                                      files['sample_submission'])
        judge = judge.set_index('ID').reindex(ids)
        no_file = judge['path'].isna()
        judge.loc[no_file, 'path'] = [f'{i}.png' for i in judge.index[no_file]]  # Kaggle names them ID.png
        judge = judge.reset_index()
    if judge['ID'].duplicated().any():
        raise dataset.DataError(f'{files["judge"]}: duplicate IDs {judge["ID"][judge["ID"].duplicated()].tolist()[:5]}')
    return judge.sort_values('ID').reset_index(drop=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=dataset.HelpFormatter)
    parser.add_argument('--checkpoint', nargs='+', required=True, help='best.pt files or run directories')
    parser.add_argument('--data', default='data/wiki', help='folder with wiki_judge.csv and wiki_judge_images/')
    parser.add_argument('--out', default='submission.csv', help='the CSV to write')
    parser.add_argument('--batch-size', type=int, default=256, help='images per forward pass')
    parser.add_argument('--no-tta', action='store_true', help='no horizontal-flip test-time augmentation')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda', 'mps'), help='where to run')
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f'--batch-size must be positive, got {args.batch_size}')
    device = train.pick_device(args.device)
    try:
        files = dataset.find_files(args.data)
        judge = test_table(files, args.data)
        image_root = files['judge_images']
        images, problems = dataset.decode_all([os.path.join(image_root, p) for p in judge['path']])
        bad = np.array([not dataset.usable(p) for p in problems])
        paths = checkpoint_files(args.checkpoint)
        images = torch.from_numpy(images)
        total, mean_age = torch.zeros(len(judge)), 0.0
        for path in paths:
            model, ckpt = load_model(path, device)
            pred = train.predict(model, images, np.arange(len(judge)), ckpt['size'], ckpt['channels'],
                                 args.batch_size, device, tta=not args.no_tta)
            total += pred
            mean_age += ckpt['y_mean'] / len(paths)
            print(f'{path}: {ckpt["model_name"]} at {ckpt["size"]} px, val RMSE {ckpt.get("val_rmse", float("nan")):.3f}',
                  flush=True)
    except (dataset.DataError, models.WeightsError, train.CheckpointError) as e:
        train.error(e)
        return 1
    except torch.OutOfMemoryError:
        train.error(f'out of GPU memory at --batch-size {args.batch_size}; try --batch-size {max(1, args.batch_size // 2)}')
        return 1
    age = (total / len(paths)).numpy()
    if bad.any():
        age[bad] = mean_age  # the RMSE-optimal guess without a picture
        print(f'warning: {int(bad.sum())} test image(s) missing or unreadable, predicted the training mean '
              f'{mean_age:.1f} for IDs {judge["ID"][bad].tolist()}', file=sys.stderr)
    submission = pd.DataFrame({'ID': judge['ID'], 'age': np.round(age, 4)})
    try:
        dataset.write_csv(submission, args.out)
    except OSError as e:
        train.error(f'cannot write {args.out}: {e.strerror or e}; choose another place with --out')
        return 1
    print(f'wrote {len(submission)} rows to {args.out} (mean age {age.mean():.1f}, '
          f'{len(paths)} model(s), flip TTA {"off" if args.no_tta else "on"})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
