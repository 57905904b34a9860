"""Reading the Kaggle files, decoding the faces once, and batch augmentation.

The other scripts import from here: the CSV parsers (Kaggle writes list literals and `#NAME?`),
the image cache (every image decoded once into one uint8 array), `read_table` (the clean table
and its faces, for train.py and cv.py), and `to_model_input`, the ONE preprocessing path used by
training, validation, cross-validation and prediction. Which rows train and which validate is
clean_data.py's business, beside its rules.
"""
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_SIZE = 100  # the Kaggle crops are 100x100; the cache always holds this size
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a photo was held
LABEL_COLUMNS = ['ID', 'dob', 'dob_str', 'photo_taken', 'full_path', 'gender', 'name',
                 'face_location', 'face_score', 'second_face_score', 'age']
JUDGE_COLUMNS = ['ID', 'full_path']
CLEAN_COLUMNS = ['ID', 'path', 'age', 'gender', 'face_score', 'second_face_score', 'person', 'name']
AGE_RANGE = (1.0, 100.0)  # years: a possible age; cleaning keeps these, predictions are clipped
# years: no wiki label is above 792, so a clean CSV with more was damaged or edited
MAX_AGE = 1000.0

# Pillow's guard against decompression bombs (about 89 million pixels) is checked in open_image
# instead, which decodes a larger JPEG photo at a reduced scale and reports any other image beyond
# it as unreadable with its row, not as a warning printed from inside Pillow.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None


class UserError(Exception):
    """Something the user can fix: a bad input file, row, checkpoint or output path, a run that
    diverged. The message names the culprit; cli.run prints it as one line and returns exit code
    1."""


class DataError(UserError):
    """Bad input files: the message names the file, row or column."""


# ----------------------------------------------------------------------------- files

class WriteError(UserError):
    """A file could not be written (a full disk, a read-only folder): the message names the file
    and the cause."""


def write_atomic(path, write):
    """Call write(tmp), flush tmp to the disk and rename it onto `path`: a crash, a power cut or a
    dropped SSH session never leaves half a file, nor an empty one, where a finished one was (as
    SQLite and git write). Temporary files that dead processes left in the folder go first. An
    output that is not a regular file (/dev/null, a FIFO) is written in place, never replaced."""
    path = str(path)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        try:
            return write(path)
        except (OSError, RuntimeError) as e:
            raise WriteError(f'cannot write {path} ({write_failure(e, path)})') from None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WriteError(f'cannot write {path}: its folder {folder} cannot be made '
                         f'({e.strerror or e})') from None
    remove_dead_temps(folder)
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{os.getpid()}{ext}'  # keep the extension: np.savez and PIL go by it
    try:
        write(tmp)
        flush_to_disk(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # some file systems cannot sync a folder
            flush_to_disk(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        raise WriteError(f'cannot write {path} ({write_failure(e, folder)})') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def flush_to_disk(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(e, where):
    """Why a write failed, in words: the system's ('No space left on device'), or for a library's
    RuntimeError the full disk that usually causes it, else its first line."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(os.path.dirname(os.path.abspath(where))).free < 1 << 20:
            return 'No space left on device'
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


TEMP_NAME = re.compile(r'\.tmp(\d+)(\.[^.]*)?$')  # write_atomic's: NAME.tmpPID.EXT


def remove_dead_temps(folder):
    """Delete the temporary files of write_atomic calls whose process is gone (kill -9, a power
    cut); a running process's are left alone."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = TEMP_NAME.search(name)
            if match and not process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def process_alive(pid):
    """Whether process `pid` runs on this machine (another user's counts). On Windows, where
    os.kill would end the process, every one counts as running."""
    if pid == os.getpid() or os.name == 'nt':
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def write_csv(df, path):
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
            f.write('\n')
    write_atomic(path, write)


def find_files(data_dir):
    """Paths of the Kaggle files under data_dir, accepting the nested (wiki_labeled/wiki_labeled/)
    and the flat (wiki_labeled/) unzip layouts. Missing entries are None."""
    def folder(name):
        for candidate in (os.path.join(data_dir, name, name), os.path.join(data_dir, name)):
            if os.path.isdir(candidate):
                return candidate
        return None

    def file(name):
        path = os.path.join(data_dir, name)
        return path if os.path.isfile(path) else None

    if not os.path.isdir(data_dir):
        raise DataError(f'data folder {data_dir} does not exist')
    return {'labels': file('wiki_labels.csv'), 'images': folder('wiki_labeled'),
            'judge': file('wiki_judge.csv'), 'judge_images': folder('wiki_judge_images'),
            'sample_submission': file('sample_submission.csv')}


def require(files, data_dir, *keys):
    looked_for = {'labels': 'wiki_labels.csv',
                  'images': 'wiki_labeled/wiki_labeled/ or wiki_labeled/',
                  'judge': 'wiki_judge.csv',
                  'judge_images': 'wiki_judge_images/wiki_judge_images/ or wiki_judge_images/'}
    missing = [looked_for[k] for k in keys if files[k] is None]
    if missing:
        raise DataError(f'{data_dir} lacks {", ".join(missing)} (unpack the Kaggle zip there, or '
                        'run `python train.py --demo` for synthetic data)')


# ----------------------------------------------------------------------------- CSV parsing

def parse_list(text):
    """Kaggle's Python-list literals: "['17/x.png']" -> '17/x.png', '[]' -> ''."""
    text = str(text).strip()
    if text.startswith('[') and text.endswith(']'):
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
        text = text[1:-1]
    return text


def parse_float(text):
    """A number written as text: '#NAME?' (Excel's mangled -inf) and '-inf' are -inf, '' is NaN."""
    text = str(text).strip()
    if text in ('', 'nan', 'NaN'):
        return math.nan
    if text in ('#NAME?', '-inf', '-Inf'):
        return -math.inf
    try:
        return float(text)
    except ValueError:
        return None  # the caller names the row


def read_csv_strict(path, columns):
    """Read a CSV as text. Names the file and the problem: missing file or columns, empty file,
    a row with more or fewer fields than the header (a stray comma, a file cut off mid-row)."""
    try:
        check_row_widths(path)
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding='utf-8')
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except pd.errors.EmptyDataError:
        raise DataError(f'{path}: the file is empty') from None
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f'{path}: cannot parse as CSV ({e})') from None
    except OSError as e:  # a folder, no permission to read, an I/O error
        raise DataError(f'{path}: cannot read ({e.strerror or e})') from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f'{path}: missing column(s) {", ".join(missing)}; found '
                        f'{", ".join(df.columns)}')
    if len(df) == 0:
        raise DataError(f'{path}: has a header but no rows')
    return df


def check_row_widths(path):
    """Every row as wide as the header: pandas pads a short row with '' silently and stops at a long
    one with a message of its own, so the csv module names the line first."""
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.reader(f)
        width = len(next(reader, []))
        for row in reader:
            if row and len(row) != width:
                why = 'is the file truncated?' if len(row) < width else 'a comma too many?'
                raise DataError(f'{path}: line {reader.line_num} has {len(row)} of {width} fields '
                                f'({why}): {",".join(row)[:200]}')


def parse_column(df, column, path, allow_nan=True, low=-math.inf, high=math.inf):
    """A column of numbers (Kaggle's spellings, see parse_float). Text, a NaN where none is allowed
    or a value outside low..high names its line."""
    values = [parse_float(v) for v in df[column]]
    for i, v in enumerate(values):
        if v is None or (not allow_nan and math.isnan(v)):
            raise DataError(f'{path}: line {i + 2}: {column} = {df[column].iat[i]!r} is not a '
                            'number')
        if not math.isnan(v) and not low <= v <= high:
            raise DataError(f'{path}: line {i + 2}: {column} = {df[column].iat[i]!r} is outside '
                            f'{low:g}..{high:g}')
    return np.array(values, dtype=np.float64)


def parse_id_column(df, column, path):
    """Whole-number IDs, each once (submissions and predictions are keyed by them); anything else
    names its line."""
    values = parse_column(df, column, path, allow_nan=False)
    first_line = {}
    for i, v in enumerate(values):
        if not (math.isfinite(v) and v == int(v)):
            raise DataError(f'{path}: line {i + 2}: {column} = {df[column].iat[i]!r} is not a '
                            'whole number')
        if v in first_line:
            raise DataError(f'{path}: line {i + 2}: {column} {int(v)} is on line '
                            f'{first_line[v]} too; each row needs its own ID')
        first_line[v] = i + 2
    return values.astype(np.int64)


def outside(rel_path):
    """A file name that leaves the image folder it is relative to (absolute, or through '..')."""
    return os.path.isabs(rel_path) or os.path.normpath(rel_path).split(os.sep)[0] == '..'


def parse_paths(paths, column, path):
    """Image names relative to their folder; one that reaches outside it names its line."""
    for i, rel in enumerate(paths):
        if outside(rel):
            raise DataError(f'{path}: line {i + 2}: {column} {rel!r} is outside the image folder')
    return list(paths)


def read_labels(path):
    """wiki_labels.csv exactly as Kaggle ships it -> one plain table (CLEAN_COLUMNS plus extras)."""
    df = read_csv_strict(path, LABEL_COLUMNS)
    out = pd.DataFrame({
        'ID': parse_id_column(df, 'ID', path),
        'path': [parse_list(p) for p in df['full_path']],
        'age': parse_column(df, 'age', path),
        'gender': parse_column(df, 'gender', path),
        'face_score': parse_column(df, 'face_score', path),
        'second_face_score': parse_column(df, 'second_face_score', path),
        'name': [parse_list(n) for n in df['name']],
        'photo_taken': df['photo_taken'],
        'face_location': df['face_location'],
    })
    out['person'] = person_keys(out['name'], out['path'])
    return out


def person_keys(names, paths):
    """Group by name, falling back to the wiki person id at the start of the file name."""
    ids = [os.path.basename(p).split('_')[0] for p in paths]
    return [f'name:{n}' if n else f'id:{i}' for n, i in zip(names, ids)]


def read_clean(path):
    """The CSV that clean_data.py writes, checked as input: possible ages, paths inside the image
    folder."""
    df = read_csv_strict(path, CLEAN_COLUMNS)
    out = pd.DataFrame({
        'ID': parse_id_column(df, 'ID', path),
        'path': parse_paths(df['path'], 'path', path),
        'age': parse_column(df, 'age', path, allow_nan=False, low=0, high=MAX_AGE),
        'gender': parse_column(df, 'gender', path, low=0, high=1),
        'face_score': parse_column(df, 'face_score', path),
        'second_face_score': parse_column(df, 'second_face_score', path),
        'person': df['person'],
        'name': df['name'],
    })
    return out


def read_judge(path):
    """wiki_judge.csv: ID and image file name (the other columns are optional metadata)."""
    df = read_csv_strict(path, JUDGE_COLUMNS)
    return pd.DataFrame({'ID': parse_id_column(df, 'ID', path),
                         'path': parse_paths([parse_list(p) for p in df['full_path']], 'full_path',
                                             path)})


# ----------------------------------------------------------------------------- images

def decode_image(path, photo=False):
    """One face as a (100, 100) uint8 array, or None. Returns (array, problem): problem is None,
    'missing', 'unreadable: ...', or for an image we could still use, 'converted: ...'.

    photo=True, for predict.py --images: first stand the image upright by its EXIF orientation (a
    phone stores a portrait photo sideways) and centre-crop it to a square, so that resizing never
    stretches a face. The Kaggle crops need neither."""
    try:
        im, note = open_image(path, photo)
        with im:
            if photo and im.width != im.height:
                note.append(f'centre square of {im.width}x{im.height}')
                im = im.crop(centre_square(im.size))
            return face_array(im, note)
    except FileNotFoundError:
        return None, 'missing'
    except (OSError, SyntaxError, ValueError) as e:
        return None, f'unreadable: {type(e).__name__}: {e}'.strip()


def centre_square(size):
    """(left, top, right, bottom) of the largest square in the middle of an image of `size`."""
    w, h = size
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


def open_image(path, photo=False):
    """(the decoded image, notes of what was done to it). Beyond MAX_PIXELS a JPEG photo is decoded
    at a half, quarter or eighth of its size (JPEG's own draft mode, which never holds the whole
    picture in memory); any other image is refused (ValueError). photo=True also stands it upright
    by its EXIF orientation."""
    im = Image.open(path)
    note, (w, h) = [], im.size
    if w * h > MAX_PIXELS:
        scale = next((s for s in (2, 4, 8) if w * h / s ** 2 <= MAX_PIXELS), None)
        if not (photo and im.format == 'JPEG' and scale):
            im.close()
            raise ValueError(f'{w}x{h} is {w * h / 1e6:.0f} million pixels, more than the '
                             f'{MAX_PIXELS / 1e6:.0f} million this decodes (photos: a JPEG up to '
                             f'{64 * MAX_PIXELS / 1e6:.0f} million); a decompression bomb?')
        im.draft(im.mode, (-(-w // scale), -(-h // scale)))
        note.append(f'decoded at 1/{scale} of {w}x{h}')
    try:
        im.load()  # decode for real: a truncated file fails here, not at open()
        if photo and im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            note.append('turned upright by its EXIF orientation')
            im = ImageOps.exif_transpose(im)
    except BaseException:
        im.close()
        raise
    return im, note


def to_8bit(im):
    """16-bit grey as 8-bit grey (convert('L') would clip it at 255); other modes as they are."""
    if im.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
        scaled = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255)
        return Image.fromarray(scaled.astype(np.uint8))
    return im


def face_array(im, note):
    """A face image as the (100, 100) uint8 grey array the models take: (array, problem)."""
    if im.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
        note.append(f'mode {im.mode}')
        im = to_8bit(im)
    elif im.mode != 'L':
        note.append(f'mode {im.mode}')
        im = im.convert('L')
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        note.append(f'size {im.size[0]}x{im.size[1]}')
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8), ('converted: ' + ', '.join(note) if note else None)


def image_size(path):
    """(width, height) of an image as it will be shown upright, from its header alone; None if it
    cannot be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)
    except (OSError, SyntaxError, ValueError):
        return None


def usable(problem):
    """decode_image's problem -> can the image be used (perhaps after conversion)?"""
    return problem is None or problem.startswith('converted')


def decode_all(paths, workers=None, photo=False):
    """Decode many images on threads (Pillow releases the GIL while decoding PNGs).
    Returns images (N, 100, 100) uint8 (zeros where unreadable) and a list of problems."""
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    problems = [None] * len(paths)

    def work(i):
        array, problems[i] = decode_image(paths[i], photo)
        if array is not None:
            images[i] = array

    # On Ctrl-C, map's iterator cancels the images still queued: only the few being decoded finish.
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(paths))))
    return images, problems


def cache_path(csv_path, rel_paths):
    key = hashlib.sha1(f'{IMAGE_SIZE}\n'.encode() + '\n'.join(rel_paths).encode()).hexdigest()[:12]
    return f'{os.path.splitext(csv_path)[0]}.images-{key}.npz'


def load_images(csv_path, table, image_root, log=print):
    """All images of a clean table as one (N, 100, 100) uint8 array, decoded once and cached next to
    the CSV (the key changes with the rows, so an edited CSV rebuilds it).
    Returns (images, ok) where ok[i] is False for an image that could not be read."""
    rel_paths = list(table['path'])
    cache = cache_path(csv_path, rel_paths)
    if os.path.exists(cache):
        try:
            with np.load(cache) as f:
                images, ok = f['images'], f['ok']
            if images.shape == (len(rel_paths), IMAGE_SIZE,
                                IMAGE_SIZE) and ok.shape == (len(rel_paths),):
                return images, ok
            log(f'warning: the image cache {cache} does not match the CSV; decoding the images '
                'again')
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            log(f'warning: the image cache {cache} is damaged ({type(e).__name__}); decoding the '
                'images again')
    log(f'decoding {len(rel_paths)} images from {image_root} (once; cached in {cache})')
    images, problems = decode_all([os.path.join(image_root, p) for p in rel_paths])
    ok = np.array([usable(p) for p in problems])
    save_cache(csv_path, rel_paths, images, ok, log)
    return images, ok


def save_cache(csv_path, rel_paths, images, ok, log=print):
    """Write the decoded images next to the CSV and drop caches of earlier versions of it."""
    cache = cache_path(csv_path, rel_paths)
    folder = os.path.dirname(os.path.abspath(cache))
    stem = os.path.basename(os.path.splitext(csv_path)[0]) + '.images-'
    try:
        write_atomic(cache, lambda tmp: np.savez(tmp, images=images, ok=ok))
        for old in os.listdir(folder):
            if (old.startswith(stem) and old.endswith('.npz') and '.tmp' not in old
                    and old != os.path.basename(cache)):
                os.remove(os.path.join(folder, old))
    except (UserError, OSError) as e:
        log(f'warning: could not write the image cache {cache} ({e}); decoding again next time')


def place_images(images, device, log=print):
    """The whole uint8 array on the GPU when it fits (0.6 GB for 60K faces), so that a batch is
    gathered there without a copy; else in host memory (each batch is gathered and copied over)."""
    images = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() < free / 4:
            return images.to(device)
        log(f'images ({images.numel() / 1e9:.1f} GB) stay in host memory: the GPU has '
            f'{free / 1e9:.1f} GB free')
        return images
    return images.to(device)


# ----------------------------------------------------------------------------- the table of a run

def read_table(args, log):
    """The clean CSV and its faces. Rows whose image cannot be read are dropped with a count;
    --limit N keeps N random rows."""
    csv = args.csv or os.path.join(args.data, 'wiki_labels_clean.csv')
    if not os.path.exists(csv):
        raise DataError(f'{csv} not found: run `python clean_data.py --data {args.data}` first '
                        '(or pass --csv FILE)')
    files = find_files(args.data)
    require(files, args.data, 'images')
    table = read_clean(csv)
    images, ok = load_images(csv, table, files['images'], log)
    if not ok.any():
        raise DataError(f'none of the {len(table)} images that {csv} lists can be read in '
                        f'{files["images"]} (first: {table["path"].iat[0]}); was the CSV made from '
                        'another --data folder?')
    if not ok.all():
        bad = table['ID'][~ok].tolist()
        more = ' ...' if len(bad) > 10 else ''
        log(f'warning: skipping {len(bad)} row(s) whose image cannot be read, IDs {bad[:10]}{more} '
            '(clean_data.py removes them)')
        table, images = table[ok].reset_index(drop=True), images[ok]
    if args.limit and args.limit < len(table):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(table), args.limit,
                                                               replace=False))
        table, images = table.iloc[keep].reset_index(drop=True), images[keep]
    return table, images


# ----------------------------------------------------------------------------- preprocessing

# ImageNet statistics for 3-channel backbones; the 1-channel CNN uses the average of the three
# channels' mean and of their standard deviation.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = 0.449, 0.226


def augment_params(n, generator, device, strengths):
    """Fresh random parameters for every image of a batch (torchvision's v2 transforms draw one
    set per batch): crop scale and aspect, position, rotation, flip, brightness, contrast.
    strengths: the recipe's ranges (train.RECIPE)."""
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)

    lo, hi = strengths['crop_aspect']
    area, aspect = uniform(*strengths['crop_area']), torch.exp(uniform(math.log(lo), math.log(hi)))
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    p = {'w': w, 'h': h, 'cx': uniform(-1, 1) * (1 - w), 'cy': uniform(-1, 1) * (1 - h),
         'angle': uniform(-strengths['rotation'], strengths['rotation']) * math.pi / 180}
    # drawn in this order, so that a seed gives the same augmentation as in earlier versions
    flip = torch.rand(n, generator=generator, device=device) < strengths['flip']
    p['flip'] = torch.where(flip, -1.0, 1.0)
    p['brightness'] = uniform(*strengths['brightness'])
    p['contrast'] = uniform(*strengths['contrast'])
    return p


def to_model_input(x, size, channels, generator=None, strengths=None, flip=False):
    """uint8 faces (B, 100, 100) on any device -> normalised float (B, channels, size, size).

    With a generator: random resized crop, flip, rotation and colour jitter of the given strengths,
    each image its own, composed into one affine warp (one grid_sample for the whole batch).
    Without: a plain resize, the same for validation, CV and prediction. flip=True mirrors every
    image (test-time aug)."""
    n = x.shape[0]
    # 0..255: the 1/255 goes into the multiply-adds below, not a pass of its own
    x = x.unsqueeze(1).float()
    scale = 1 / 255
    if generator is not None:
        p = augment_params(n, generator, x.device, strengths)
        cos, sin = p['angle'].cos(), p['angle'].sin()
        # The sampling grid built as (n, 2, size, size) planes and handed over as the
        # (n, size, size, 2) view grid_sample takes. F.affine_grid says the same in one call
        # (tests/test_data.py checks that they agree), but computes it with a batched matmul,
        # which is slower. `base`: the pixel centres.
        base = (torch.arange(size, device=x.device, dtype=torch.float32) * 2 + 1) / size - 1
        along_x = p['w'] * p['flip']
        along_x = torch.stack([along_x * cos, along_x * sin], 1).view(n, 2, 1, 1)
        along_y = torch.stack([-p['h'] * sin, p['h'] * cos], 1).view(n, 2, 1, 1)
        centre = torch.stack([p['cx'], p['cy']], 1).view(n, 2, 1, 1)
        grid = along_x * base.view(1, 1, 1, size) + (along_y * base.view(1, 1, size, 1) + centre)
        x = F.grid_sample(x, grid.permute(0, 2, 3, 1), mode='bilinear', padding_mode='border',
                          align_corners=False)
        # ((x/255 - m) * contrast + m) * brightness, m the image's mean: one multiply-add a pixel
        c, b = p['contrast'].view(-1, 1, 1, 1), p['brightness'].view(-1, 1, 1, 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True) / 255
        x = torch.addcmul(m * b * (1 - c), x, c * b / 255).clamp_(0, 1)
        scale = 1.0
    elif size != IMAGE_SIZE:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False,
                          antialias=False)
    if flip:
        x = x.flip(-1)
    # (x * scale - mean) / std for each channel with Python numbers: on a GPU, a tensor made from
    # a list (torch.tensor(IMAGENET_MEAN, device=...)) is a blocking copy that stalls every batch.
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((GREY_MEAN,), (GREY_STD,))
    planes = [x.mul(scale / s).sub_(m / s) for m, s in zip(mean, std)]
    return planes[0] if channels == 1 else torch.cat(planes, 1)  # grey repeated for RGB backbones
