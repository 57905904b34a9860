"""predict.py --images and --labels on photos the tests make: EXIF rotation, non-square and odd
files, folder walks, scoring a labelled folder; the per-decade errors and the collapse warning."""
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import demo_data
import metrics
import models
import predict

def face(age=40.0, seed=0):
    return demo_data.draw_face(np.random.default_rng(seed), age, True)


def run_images(trained, paths, out, *extra):
    return predict.main(['--checkpoint', trained, '--images', *map(str, paths), '--out', str(out),
                         '--device', 'cpu', *extra])


def test_exif_rotated_colour_jpeg_predicts_like_the_upright_face(trained, tmp_path):
    colour = Image.fromarray(face()).convert('RGB')
    colour.save(tmp_path / 'upright.jpg', quality=100)
    # A phone stores a portrait sideways and says in EXIF (orientation 6) how to turn it back.
    exif = Image.Exif()
    exif[dataset.EXIF_ORIENTATION] = 6
    colour.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'sideways.jpg', quality=100,
                                                     exif=exif)
    upright, _ = dataset.decode_image(str(tmp_path / 'upright.jpg'), photo=True)
    turned, problem = dataset.decode_image(str(tmp_path / 'sideways.jpg'), photo=True)
    assert 'turned upright' in problem
    # the same face (JPEG aside)
    assert np.abs(upright.astype(int) - turned.astype(int)).mean() < 1.5
    ignored, _ = dataset.decode_image(str(tmp_path / 'sideways.jpg'))
    # what ignoring EXIF would see
    assert np.abs(upright.astype(int) - ignored.astype(int)).mean() > 10
    out = tmp_path / 'pred.csv'
    assert run_images(trained, [tmp_path / 'upright.jpg', tmp_path / 'sideways.jpg'], out) == 0
    ages = pd.read_csv(out).set_index('path')['age']
    upright = ages[str(tmp_path / 'upright.jpg')]
    assert ages[str(tmp_path / 'sideways.jpg')] == pytest.approx(upright, abs=0.3)


def test_non_square_image_is_its_centre_square(trained, tmp_path):
    square = face(age=65, seed=3)
    wide = np.random.default_rng(0).integers(0, 256, (100, 170), dtype=np.uint8)
    wide[:, 35:135] = square  # the face in the middle, clutter at the sides
    Image.fromarray(square).save(tmp_path / 'square.png')
    Image.fromarray(wide).save(tmp_path / 'wide.png')
    decoded, problem = dataset.decode_image(str(tmp_path / 'wide.png'), photo=True)
    np.testing.assert_array_equal(decoded, square)
    assert 'centre square of 170x100' in problem
    out = tmp_path / 'pred.csv'
    assert run_images(trained, [tmp_path], out) == 0
    ages = pd.read_csv(out).set_index('path')['age']
    assert ages[str(tmp_path / 'wide.png')] == ages[str(tmp_path / 'square.png')]


def test_folder_walk_odd_files_and_the_table(trained, tmp_path, capsys):
    folder = tmp_path / 'photos'
    (folder / 'a' / 'b').mkdir(parents=True)
    Image.fromarray(face(seed=1)).save(folder / 'z.png')
    Image.fromarray(face(seed=2)).convert('RGB').save(folder / 'a' / 'y.webp')
    deep = (face(seed=4).astype(np.uint16) * 257)
    Image.fromarray(deep).save(folder / 'a' / 'b' / 'x16.png')  # a 16-bit grey PNG
    Image.fromarray(face(seed=5)).resize((12, 12)).save(folder / 'a' / 'tiny.png')
    (folder / 'a' / 'empty.jpg').write_bytes(b'')
    (folder / 'a' / 'notes.txt').write_text('not an image\n')
    (folder / '.DS_Store').write_bytes(b'\x00\x01')  # hidden files are not photos
    out = tmp_path / 'pred.csv'
    assert run_images(trained, [folder], out) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(out)
    readable = [folder / 'a' / 'b' / 'x16.png', folder / 'a' / 'tiny.png', folder / 'a' / 'y.webp',
                folder / 'z.png']
    assert list(table.columns) == ['path', 'age']
    assert list(table['path']) == list(map(str, readable))
    assert table['age'].between(1, 100).all()
    printed = [line.split()[0] for line in captured.out.splitlines()
               if line.startswith(str(folder))]
    assert printed == sorted(map(str,
                                 readable + [folder / 'a' / 'empty.jpg',
                                             folder / 'a' / 'notes.txt']))
    assert re.search(r'empty\.jpg +unreadable', captured.out)
    assert re.search(r'notes\.txt +unreadable', captured.out)
    assert 'warning: 2 file(s) could not be read as images and are not in the CSV' in captured.err
    x16, _ = dataset.decode_image(str(folder / 'a' / 'b' / 'x16.png'), photo=True)
    np.testing.assert_array_equal(x16, face(seed=4))  # 16 bits scaled, not clipped


def test_uncropped_photos_get_a_hint(trained, tmp_path, capsys):
    Image.fromarray(face()).resize((300, 600)).save(tmp_path / 'tall.png')
    Image.fromarray(face()).resize((800, 800)).save(tmp_path / 'big.png')
    Image.fromarray(face()).save(tmp_path / 'good.png')
    assert run_images(trained, [tmp_path], tmp_path / 'pred.csv') == 0
    out = capsys.readouterr().out
    hints = out.split('hint:')[1]
    assert 'tall.png is 300x600, far from square' in hints
    assert 'big.png is 800x800, far larger' in hints
    assert 'good.png' not in hints


def test_labels_scores_like_numpy_and_counts_the_missing(trained, tmp_path, capsys):
    folder = tmp_path / 'faces'
    (folder / 'sub').mkdir(parents=True)
    ages = {'f0.png': 23.0, 'sub/f1.png': 35.5, 'f2.png': 51.0, 'f3.png': 70.2, 'f4.png': 8.0}
    for i, name in enumerate(ages):
        Image.fromarray(face(age=ages[name], seed=i)).save(folder / name)
    # Names relative to the folder, and one file that is not there.
    labels = pd.DataFrame({'file': [*ages, 'gone.png'], 'age': [*ages.values(), 44.0]})
    labels.to_csv(folder / 'labels.csv', index=False)
    out = tmp_path / 'pred.csv'
    assert run_images(trained, [folder], out, '--labels', str(folder / 'labels.csv')) == 0
    text = capsys.readouterr().out
    pred = pd.read_csv(out)
    assert len(pred) == 5  # the labels CSV inside the folder is not taken for a photo
    merged = pd.DataFrame({'path': [str(folder / f) for f in ages],
                           'age': list(ages.values())}).merge(
        pred, on='path', suffixes=('', '_pred'))
    err = merged['age_pred'] - merged['age']
    rmse, mae = np.sqrt(np.mean(err ** 2)), np.mean(np.abs(err))
    r2 = 1 - np.sum(err ** 2) / np.sum((merged['age'] - merged['age'].mean()) ** 2)
    assert ('5 of 6 labelled image(s) found and predicted, 1 missed (not found or unreadable: '
            'gone.png)') in text
    assert f'RMSE {rmse:.3f}  MAE {mae:.3f}  R^2 {r2:.3f}  (n=5)' in text
    assert '0-9 ' in text and '70-79 ' in text
    assert os.path.getsize(tmp_path / 'pred_vs_actual.png') > 1000
    assert os.path.getsize(tmp_path / 'pred_by_decade.png') > 1000
    # Absolute names work too.
    labels = pd.DataFrame({'file': [str(folder / 'f2.png')], 'age': [51.0]})
    labels.to_csv(tmp_path / 'abs.csv', index=False)
    assert run_images(trained, [folder], out, '--labels', str(tmp_path / 'abs.csv')) == 0
    assert '1 of 1 labelled image(s) found' in capsys.readouterr().out


def test_images_on_the_demo_judge_files_score_like_the_kaggle_submission(tiny_data, trained,
                                                                         tmp_path, capsys):
    """The demo's test images as plain files with its hidden answers as labels give the RMSE of the
    Kaggle-layout submission scored against the same answers."""
    sub = tmp_path / 'submission.csv'
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out', str(sub),
                         '--device', 'cpu']) == 0
    answers = pd.read_csv(os.path.join(tiny_data, 'demo_judge_answers.csv'))
    scored = answers.merge(pd.read_csv(sub), on='ID', suffixes=('', '_pred'))
    rmse = np.sqrt(np.mean((scored['age_pred'] - scored['age']) ** 2))
    judge_images = os.path.join(tiny_data, 'wiki_judge_images', 'wiki_judge_images')
    pd.DataFrame({'file': [f'{i}.png' for i in answers['ID']], 'age': answers['age']}).to_csv(
        tmp_path / 'answers.csv', index=False)
    capsys.readouterr()
    assert run_images(trained, [judge_images], tmp_path / 'pred.csv', '--labels',
                      str(tmp_path / 'answers.csv')) == 0
    text = capsys.readouterr().out
    assert f'{len(answers)} of {len(answers)} labelled image(s) found' in text
    assert float(re.search(r'^RMSE (\S+)', text, re.M).group(1)) == pytest.approx(rmse, abs=2e-3)


@pytest.mark.parametrize('flags, message', [
    (['--data', 'x', '--images', 'y'], 'not allowed with argument'),
    ([], 'one of the arguments --data --images is required'),
])
def test_data_and_images_exclude_each_other(trained, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(['--checkpoint', trained, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_path_that_is_not_there(trained, tmp_path, capsys):
    assert run_images(trained, [tmp_path / 'nothing.jpg'], tmp_path / 'p.csv') == 1
    assert f'--images {tmp_path / "nothing.jpg"}: no such file or folder' in capsys.readouterr().err


def test_train_run_has_the_error_by_decade(trained):
    metrics = json.loads(open(os.path.join(trained, 'metrics.json')).read())
    val = pd.read_csv(os.path.join(trained, 'val_predictions.csv'))
    decade = np.minimum(val['age'] // 10, 9)
    for d, part in val.groupby(decade):
        name = f'{int(d) * 10}-{int(d) * 10 + 9}' if d < 9 else '90+'
        rmse = np.sqrt(np.mean((part['prediction'] - part['age']) ** 2))
        assert metrics['rmse_by_decade'][name]['rmse'] == pytest.approx(rmse, abs=1e-3)
        assert metrics['rmse_by_decade'][name]['n'] == len(part)
    assert sum(v['n'] for v in metrics['rmse_by_decade'].values()) == len(val)
    assert Image.open(os.path.join(trained, 'error_by_decade.png')).size == (640, 400)


def test_collapse_warning_for_one_age_for_everyone_only():
    rng = np.random.default_rng(0)
    age = rng.uniform(5, 90, 500)
    warning = metrics.collapse_warning(age, np.full(500, 36.0))
    assert 'collapsed towards the mean age 36.0' in warning
    assert 'collapsed' in metrics.collapse_warning(age, age.mean() + (age - age.mean()) * 0.2)
    assert metrics.collapse_warning(age, age + rng.normal(0, 8, 500)) is None
    assert metrics.collapse_warning(age, age.mean() + (age - age.mean()) * 0.5) is None


def test_labels_with_a_constant_model_warn(trained, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'faces'
    folder.mkdir()
    for i, a in enumerate([10, 30, 50, 70, 90]):
        Image.fromarray(face(age=a, seed=i)).save(folder / f'{i}.png')
    pd.DataFrame({'file': [f'{i}.png' for i in range(5)], 'age': [10, 30, 50, 70, 90]}).to_csv(
        tmp_path / 'l.csv', index=False)
    monkeypatch.setattr(models, 'predict_ages', lambda model, images, rows, *a,
                        **k: torch.full((len(rows),), 37.0))
    assert run_images(trained, [folder], tmp_path / 'p.csv', '--labels',
                      str(tmp_path / 'l.csv')) == 0
    assert 'collapsed towards the mean age 37.0' in capsys.readouterr().out


def test_framing_picture_is_drawn(tmp_path):
    path = demo_data.framing_picture(str(tmp_path / 'framing.png'))
    im = Image.open(path)
    assert im.size == (4 * 212 + 12, 254) and np.asarray(im).std() > 20


def test_rmse_by_decade_names_and_numbers():
    age, pred = np.array([5.0, 15, 17.5, 95, 100]), np.array([7.0, 15, 20.5, 80, 90])
    by_decade = metrics.rmse_by_decade(age, pred)
    # empty decades are left out; 100 counts as 90+
    assert list(by_decade) == ['0-9', '10-19', '90+']
    assert by_decade['0-9'] == {'rmse': 2.0, 'n': 1}
    assert by_decade['10-19'] == {'rmse': pytest.approx(np.sqrt(9 / 2)), 'n': 2}
    assert by_decade['90+'] == {'rmse': pytest.approx(np.sqrt((225 + 100) / 2)), 'n': 2}


def test_a_submission_is_scored_by_its_answers_and_a_collapse_is_warned(tiny_data, trained,
                                                                        tmp_path, monkeypatch,
                                                                        capsys):
    """--data with --labels ID,age (the demo's hidden answers) scores the submission it writes, as
    numpy does from the two CSVs; a model that predicts one age for everyone is warned of."""
    answers = os.path.join(tiny_data, 'demo_judge_answers.csv')
    out = tmp_path / 'sub.csv'
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--labels', answers, '--out',
                         str(out),
                         '--device', 'cpu']) == 0
    both = pd.read_csv(out).merge(pd.read_csv(answers), on='ID', suffixes=('', '_true'))
    rmse = np.sqrt(np.mean((both['age'] - both['age_true']) ** 2))
    text = capsys.readouterr().out
    assert f'labels: {len(both)} of {len(both)} labelled ID(s) predicted' in text
    assert float(re.search(r'^RMSE (\S+)', text, re.M).group(1)) == pytest.approx(rmse, abs=2e-3)
    assert (tmp_path / 'sub_vs_actual.png').exists() and (tmp_path / 'sub_by_decade.png').exists()
    monkeypatch.setattr(models, 'predict_ages', lambda model, images, rows, *a,
                        **k: torch.full((len(rows),), 37.0))
    assert predict.main(['--checkpoint', trained, '--data', tiny_data, '--out',
                         str(tmp_path / 'flat.csv'),
                         '--device', 'cpu']) == 0
    assert 'collapsed towards the mean age 37.0' in capsys.readouterr().err
