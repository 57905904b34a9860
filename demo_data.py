"""Synthetic faces in the Kaggle layout, for `--demo` runs and the tests (no real person's photo).

    python demo_data.py data/demo              # write the synthetic Kaggle-layout demo folder
    python demo_data.py data/demo --n 3000     # a bigger one
    python demo_data.py --framing framing.png  # the README's picture of how to frame a photo
    python demo_data.py photos/ --paste FACES/ --labels FACES/labels.csv   # faces in bigger photos

--paste makes photos to try predict.py --find-face on, from face crops you have (UTKFace's, say):
each pasted at a random place and size into a larger picture of noise, with a labels.csv.

Each face is drawn with Pillow so that its age shows in the pixels (proportions, greying and
receding hair, wrinkles), and the folder carries the real files' dirt at realistic rates:
`#NAME?` face scores, missing genders, second faces, impossible ages, one missing and one
truncated PNG. `demo_judge_answers.csv` (not part of Kaggle's layout) holds the test set's ages.
"""
import argparse
import datetime
import os
import sys

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

import clean_data
import dataset
import predict
from cli import HelpFormatter, number, run
from dataset import AGE_RANGE, IMAGE_SIZE, LABEL_COLUMNS, parse_list, write_atomic, write_csv

FIRST = ['Ana', 'Björn', 'Chloé', 'Dmitri', 'Eva', 'Farid', 'Greta', 'Hugo', 'Ines', 'Jonas',
         'Kaja', 'Luis', 'Mira', 'Nils', 'Olga', 'Pavel', 'Rosa', 'Sami', 'Tereza', 'Umar', 'Vera',
         'Zoë']
LAST = ['Novák', 'Jauhojärvi', 'García', 'Smith', "O'Neil", 'Müller', 'Rossi', 'Kowalski',
        'Ito', 'Dubois', 'Hansen', 'Silva', 'Nowak', 'Brown', 'Lindqvist', 'Petrov', 'Costa',
        'Yılmaz']


def draw_face(rng, age, male):
    """A 100x100 grey face whose age shows in the pixels: proportions (children have rounder faces,
    bigger eyes set lower), greying and receding hair, forehead and eye wrinkles, sagging jaw;
    gender shows in hair length and beard."""
    bg = int(rng.integers(40, 210))
    im = Image.new('L', (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(im)
    grow = min(age, 18) / 18
    old = float(np.clip((age - 30) / 50, 0, 1))
    cx, cy = 50 + rng.normal(0, 2.5), 53 + rng.normal(0, 2.5)
    fw = 27 + 7 * grow + rng.normal(0, 1.5)
    fh = fw * (1.02 + 0.22 * grow + (0.05 if male else 0) + rng.normal(0, 0.03))
    skin = int(np.clip(rng.normal(170, 22) - 15 * old, 80, 235))
    hair = float(np.clip(rng.normal(55, 30), 10, 150))
    grey = float(np.clip((age - 28) / 45 + rng.normal(0, 0.08), 0, 1))
    hair = int(hair + (225 - hair) * grey)
    if not male:  # long hair falls behind the face
        d.rounded_rectangle([cx - fw - 6, cy - fh - 4, cx + fw + 6,
                             cy + fh * (0.8 + rng.random() * 0.5)],
                            radius=14, fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    recede = old * (0.6 if male else 0.15) * fh * rng.random() ** 0.5
    d.chord([cx - fw - 2, cy - fh - 5 - recede * 0.2, cx + fw + 2,
             cy - fh * 0.15 + (0 if male else 6) - recede],
            180, 360, fill=hair)
    eye_y = cy - fh * (0.05 + 0.17 * grow)
    eye_r = 4.6 - 1.7 * grow + rng.normal(0, 0.3)
    for side in (-1, 1):
        ex = cx + side * fw * 0.42
        d.ellipse([ex - eye_r * 1.4, eye_y - eye_r, ex + eye_r * 1.4, eye_y + eye_r], fill=235)
        d.ellipse([ex - eye_r * 0.6, eye_y - eye_r * 0.6, ex + eye_r * 0.6, eye_y + eye_r * 0.6],
                  fill=25)
        for k in range(int(round(old * 3 + rng.normal(0, 0.4)))):  # crow's feet
            y = eye_y - 2 + 2.5 * k
            d.line([ex + side * eye_r * 1.6, y, ex + side * (eye_r * 1.6 + 5), y + (k - 1) * 2],
                   fill=max(0, skin - 70), width=1)
        if age > 45:  # bags under the eyes
            d.arc([ex - eye_r * 1.4, eye_y, ex + eye_r * 1.4, eye_y + eye_r * 2.2], 20, 160,
                  fill=max(0, skin - 50), width=1)
    for k in range(int(round((age - 22) / 9 + rng.normal(0, 0.5)))):  # forehead lines
        y = eye_y - 8 - 3 * k
        if y < cy - fh + 4:
            break
        d.arc([cx - fw * 0.6, y, cx + fw * 0.6, y + 5], 200, 340, fill=max(0, skin - 45 - 5 * k),
              width=1)
    nose_y = cy + fh * (0.12 + 0.05 * grow)
    d.line([cx, eye_y + 4, cx - 2, nose_y], fill=skin - 40, width=1)
    mouth_y = cy + fh * (0.42 + 0.06 * old)
    mw = fw * (0.32 + 0.1 * grow)
    d.arc([cx - mw, mouth_y - 4, cx + mw, mouth_y + 3 - 4 * old], 10, 170, fill=90, width=2)
    if age > 35:  # nasolabial folds
        for side in (-1, 1):
            d.line([cx + side * 6, nose_y + 1, cx + side * (mw + 3), mouth_y + 2],
                   fill=max(0, skin - int(25 + 35 * old)), width=1)
    if male and age > 18 and rng.random() < 0.35:
        d.chord([cx - fw * 0.85, mouth_y - 6, cx + fw * 0.85, cy + fh + 2], 0, 180, fill=hair)
    im = im.rotate(rng.normal(0, 4), resample=Image.BILINEAR, fillcolor=bg)
    im = im.filter(ImageFilter.GaussianBlur(0.6))
    a = np.asarray(im, dtype=np.float32) * rng.uniform(0.8, 1.15) + rng.normal(0, 6, im.size)
    return np.clip(a, 0, 255).astype(np.uint8)


def draw_clutter(rng):
    """What a `#NAME?` row often shows: no detectable face."""
    im = Image.new('L', (IMAGE_SIZE, IMAGE_SIZE), int(rng.integers(0, 255)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        box = sorted(rng.integers(0, 100, 2)), sorted(rng.integers(0, 100, 2))
        d.rectangle([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(0, 255)))
    return np.asarray(im)


def datenum(date):
    return date.toordinal() + 366  # Matlab's day count starts a year earlier than Python's


def make_demo_data(root, n=1500, n_judge=300, seed=0):
    """A complete Kaggle-layout folder with drawn faces and real-world dirt at realistic rates."""
    rng = np.random.default_rng(seed)
    labelled = os.path.join(root, 'wiki_labeled', 'wiki_labeled')
    records = write_labelled(rng, draw_people(rng, n), labelled)
    judge, answers = write_judge(rng, n_judge, os.path.join(root, 'wiki_judge_images',
                                                            'wiki_judge_images'))
    write_csv(pd.DataFrame(judge), os.path.join(root, 'wiki_judge.csv'))
    # Not part of Kaggle's layout: the hidden truth, so a demo submission can be scored.
    write_csv(pd.DataFrame(answers), os.path.join(root, 'demo_judge_answers.csv'))
    # Last: train.py takes a folder with wiki_labels.csv as complete.
    write_csv(pd.DataFrame(records, columns=LABEL_COLUMNS), os.path.join(root, 'wiki_labels.csv'))
    return root


def draw_people(rng, n):
    """n photos of people: a person has one to a few, taken in different years."""
    rows, person = [], 0
    while len(rows) < n:
        person += 1
        pid = int(rng.integers(10_000, 50_000_000))
        male = rng.random() < 0.78
        initial = chr(ord('A') + int(rng.integers(0, 26)))
        has_name = rng.random() > 0.02
        name = f"['{rng.choice(FIRST)} {initial}. {rng.choice(LAST)}']" if has_name else '[]'
        birth = datetime.date(1900, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 29_000)))
        adult = rng.random() > 0.08
        base_age = float(np.clip(14 + rng.gamma(2.0, 11.0) if adult else rng.uniform(1, 14), 1, 99))
        first_year = min(birth.year + int(round(base_age)), 2015)
        for year in sorted(set(first_year - rng.integers(0, 8, 1 + rng.poisson(0.35)))):
            year = int(year)
            age = (datenum(datetime.date(year, 2, 1)) - datenum(birth)) / 365.25
            rows.append(dict(pid=pid, male=male, name=name, birth=birth, year=year,
                             age=max(age, 0.0)))
    return rows[:n]


def write_labelled(rng, rows, label_dir):
    """The training images and their wiki_labels.csv records, with the dirt of the real files."""
    records = []
    for i, r in enumerate(rows):
        ID = 2002 + i
        dob = datenum(r['birth'])
        age = r['age']
        u = rng.random()
        if u < 0.01:
            age = 0.0  # photo year before birth, clipped to 0 as in the real data
        elif u < 0.02:
            age = float(rng.uniform(101, 790))  # nonsense birth dates
        no_face = rng.random() < 0.28
        second = (not no_face) and rng.random() < 0.06
        gender = '' if rng.random() < 0.04 else ('1.0' if r['male'] else '0.0')
        rel = f"{r['pid'] % 100:02d}/{r['pid']}_{r['birth'].isoformat()}_{r['year']}.png"
        drawn_age = min(max(r['age'], AGE_RANGE[0]), AGE_RANGE[1])
        img = draw_clutter(rng) if no_face else draw_face(rng, drawn_age, r['male'])
        if second:  # a smaller second face in a corner
            small = draw_face(rng, float(rng.uniform(5, 80)), rng.random() < 0.5)
            img = img.copy()
            img[:40, 60:] = np.asarray(Image.fromarray(small).resize((40, 40)))
        os.makedirs(os.path.join(label_dir, rel[:2]), exist_ok=True)
        Image.fromarray(img).save(os.path.join(label_dir, rel))
        if no_face:
            location, score = '[[1 1 1 1]]', '#NAME?'
        else:
            x0, y0 = rng.uniform(20, 300, 2)
            s = rng.uniform(60, 250)
            location = f'[[{x0:.5f} {y0:.6g} {x0 + s:.5f} {y0 + s:.6g}]]'
            score = f'{rng.uniform(0.3, 6.5):.9f}'
        records.append({'ID': ID, 'dob': dob, 'dob_str': f"['{r['birth'].strftime('%d-%b-%Y')}']",
                        'photo_taken': r['year'], 'full_path': f"['{rel}']", 'gender': gender,
                        'name': r['name'], 'face_location': location, 'face_score': score,
                        'second_face_score': f'{rng.uniform(0.5, 4):.9f}' if second else '',
                        'age': round(age, 6)})
    # One file that never made it out of the zip, one that was cut short.
    missing, corrupt = records[7]['full_path'], records[11]['full_path']
    os.remove(os.path.join(label_dir, parse_list(missing)))
    with open(os.path.join(label_dir, parse_list(corrupt)), 'r+b') as f:
        f.truncate(200)
    return records


def write_judge(rng, n_judge, judge_dir):
    """The test images: (wiki_judge.csv's rows, their hidden ages)."""
    ids = np.sort(rng.choice(np.arange(1, int(n_judge * 1.42) + 1), n_judge, replace=False))
    judge, answers = [], []
    os.makedirs(judge_dir, exist_ok=True)
    for ID in ids:
        male = rng.random() < 0.78
        age = float(np.clip(14 + rng.gamma(2.0, 11.0), 1, 99))
        Image.fromarray(draw_face(rng, age, male)).save(os.path.join(judge_dir, f'{ID}.png'))
        gender = '' if rng.random() < 0.02 else ('1.0' if male else '0.0')
        score = repr(float(rng.uniform(1, 6.5))) if rng.random() > 0.01 else '-inf'
        judge.append({'ID': int(ID), 'full_path': f"['{ID}.png']", 'gender': gender,
                      'face_score': score, 'second_face_score': ''})
        answers.append({'ID': int(ID), 'age': round(age, 3)})
    return judge, answers


def prepare(data_dir, csv, log=print):
    """--demo: make the synthetic folder in data_dir unless it is there, and its clean CSV."""
    if not os.path.exists(os.path.join(data_dir, 'wiki_labels.csv')):
        log(f'making synthetic demo data in {data_dir}')
        make_demo_data(data_dir)
    if not os.path.exists(csv) and clean_data.main(['--data', data_dir, '--out', csv]) != 0:
        raise dataset.DataError(f'cleaning the demo data in {data_dir} failed (see above)')


def framing_picture(path, seed=7):
    """The README's picture of framing, from drawn faces only: a training face with the face box a
    finder reports in it; a photo with the box found and the square --find-face crops around it;
    that crop, framed as the training face is; and what a photo gives without --find-face."""
    rng = np.random.default_rng(seed)
    training = Image.fromarray(draw_face(rng, 35, True))
    # A "photo": a wide scene with shoulders, the face (a second drawing) off its centre.
    head = draw_face(rng, 35, True)
    bg = int(np.median(np.concatenate([head[:8].ravel(), head[:, :8].ravel()])))
    scene = Image.new('L', (600, 300), bg)
    d = ImageDraw.Draw(scene)
    d.chord([320, 200, 580, 420], 180, 360, fill=max(0, bg - 60))  # shoulders
    d.rectangle([420, 160, 480, 215], fill=int(np.clip(bg + 40, 0, 255)))  # neck
    scene.paste(Image.fromarray(head).resize((150, 150), Image.BILINEAR), (375, 25))
    face = face_box(375, 25, 150)  # where a finder puts the face box in such a crop
    square = predict.face_square(face)  # ... and the square --find-face crops around it
    panels = [(training, 'a training face', [face_box(0, 0, 100)]),
              (scene, '--find-face: box, square', [face, square]),
              (scene.crop(square), 'the crop: as in training', []),
              (scene.crop(dataset.centre_square(scene.size)), 'without it: centre square', [])]
    W, H, pad = 200, 200, 12  # each panel shown at 200 px wide
    picture = Image.new('L', (len(panels) * (W + pad) + pad, H + 2 * pad + 30), 255)
    d = ImageDraw.Draw(picture)
    for i, (im, caption, boxes) in enumerate(panels):
        x, scale = pad + i * (W + pad), W / im.size[0]
        shown = im.resize((W, round(im.size[1] * scale)), Image.BILINEAR)
        y = pad + (H - shown.size[1]) // 2
        picture.paste(shown, (x, y))
        for box in boxes:
            d.rectangle([x + box[0] * scale, y + box[1] * scale, x + box[2] * scale,
                         y + box[3] * scale], outline=255 if box is boxes[0] else 0)
        d.text((x, H + pad + 8), caption, fill=0)
    write_atomic(path, lambda tmp: picture.save(tmp))
    return path


def face_box(left, top, side):
    """The face box a finder reports in a crop of `side` px at (left, top) that is framed as the
    training crops are (predict.FACE_BOX)."""
    b = predict.FACE_BOX
    cx, cy, w, h = left + b['centre_x'] * side, top + b['centre_y'] * side, b['width'] * side, \
        b['height'] * side
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def paste_faces(faces_dir, labels_csv, out, n=300, min_age=15, seed=0, size=(1200, 900)):
    """Photos to test predict.py --find-face on: n labelled face crops (labels_csv: file,age, the
    files in faces_dir; those of min_age and over) each pasted at a random place and size (180-400
    px) into a larger picture of noise. Writes out/NAME.jpg and out/labels.csv (file,age)."""
    rng = np.random.default_rng(seed)
    labels = dataset.read_csv_strict(labels_csv, ['file', 'age'])
    labels = labels.assign(age=dataset.parse_column(labels, 'age', labels_csv, allow_nan=False))
    labels = labels[labels['age'] >= min_age]
    picked = labels.iloc[np.sort(rng.choice(len(labels), min(n, len(labels)), replace=False))]
    os.makedirs(out, exist_ok=True)
    for name in picked['file']:
        with Image.open(os.path.join(faces_dir, name)) as face:
            face = face.convert('RGB')
        side = int(rng.integers(180, 401))
        noise = rng.normal(rng.uniform(40, 210, 3), 40, (size[1], size[0], 3))
        photo = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
        x, y = int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side))
        photo.paste(face.resize((side, side), Image.BILINEAR), (x, y))
        write_atomic(os.path.join(out, name), lambda tmp: photo.save(tmp, 'JPEG', quality=90))
    write_csv(picked[['file', 'age']], os.path.join(out, 'labels.csv'))
    return len(picked)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('out', metavar='DIR', nargs='?',
                        help='write the synthetic demo folder here')
    parser.add_argument('--framing', metavar='PNG',
                        help="draw the README's picture of how to frame a photo")
    parser.add_argument('--paste', metavar='FACES',
                        help='instead: paste the face crops in the folder FACES (with --labels) '
                             'into larger pictures, to test predict.py --find-face')
    parser.add_argument('--labels', metavar='CSV', help='with --paste: file,age of the faces')
    parser.add_argument('--min-age', type=number(at_least=0), default=15,
                        help='with --paste: the youngest face to paste')
    parser.add_argument('--n', type=number(int, at_least=1),
                        help='labelled rows (at least 20; default 1500), or with --paste the photos '
                             '(default 300)')
    parser.add_argument('--n-judge', type=number(int, at_least=1), default=300, help='test rows')
    parser.add_argument('--seed', type=number(int, at_least=0), default=0,
                        help='seed of the drawn faces')
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.framing:
        return run(lambda: print(f'wrote {framing_picture(args.framing)}'))
    if not args.out:
        parser.error('give a folder DIR for the demo data, or --framing PNG')
    if args.paste:
        if not args.labels:
            parser.error('--paste needs --labels CSV (file,age of the faces)')

        def paste():
            n = paste_faces(args.paste, args.labels, args.out, args.n or 300, args.min_age,
                            args.seed)
            print(f'wrote {n} photos and labels.csv to {args.out}')
        return run(paste)
    if os.path.exists(os.path.join(args.out, 'wiki_labels.csv')):
        parser.error(f'{args.out} already holds a data set; choose another folder')
    if args.n is not None and args.n < 20:
        parser.error(f'--n {args.n}: a demo data set needs at least 20 labelled rows')

    def work():
        make_demo_data(args.out, args.n or 1500, args.n_judge, args.seed)
        print(f'wrote {args.n or 1500} labelled and {args.n_judge} test images to {args.out}')
    return run(work)


if __name__ == '__main__':
    sys.exit(main())
