"""predict.py --images --find-face: the crop around a found face (a stand-in finder that reports
boxes the test chooses, so the arithmetic is checked exactly), the rows and notes it writes, and
the real finder (MTCNN, the optional extra) on photos the test makes.

    python -m pytest -q tests/test_faces.py
"""
import os
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dataset
import demo_data
import predict

BOX = predict.FACE_BOX


def stand_in(boxes_by_size):
    """A face finder that reports, for an image of size (w, h), the boxes given for that size,
    and records the sizes it was shown."""
    seen = []

    def find(rgb):
        seen.append(rgb.size)
        assert rgb.mode == 'RGB'
        return boxes_by_size.get(rgb.size, [])
    find.seen = seen
    return find


def photo(path, size=(400, 300), exif_orientation=None):
    """A photo of random pixels (every crop of it differs), saved as a JPEG."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    if exif_orientation:
        exif = Image.Exif()
        exif[dataset.EXIF_ORIENTATION] = exif_orientation
        im.save(path, quality=95, exif=exif)
    else:
        im.save(path, quality=95)
    return path


def test_the_square_puts_the_face_where_the_training_crops_have_it():
    x0, y0, w, h = 100.0, 50.0, 54.0, 70.5  # a face box of the training crops' shape
    left, top, right, bottom = predict.face_square((x0, y0, x0 + w, y0 + h))
    assert right - left == bottom - top == 100  # the crop a training face of that size has
    assert (left, top) == (round(x0 + w / 2 - BOX['centre_x'] * 100),
                           round(y0 + h / 2 - BOX['centre_y'] * 100))
    big = predict.face_square((x0, y0, x0 + 2 * w, y0 + 2 * h))  # twice the face, twice the crop
    assert big[2] - big[0] == 200


def test_a_found_face_is_cropped_and_preprocessed_as_a_training_face(tmp_path):
    path = photo(tmp_path / 'p.jpg')
    box = (150.0, 60.0, 204.0, 130.5)
    [(name, face, what)] = predict.framed_faces([str(path)], stand_in({(400, 300): [(0.98, box)]}))
    upright = Image.open(path)
    expected, _ = dataset.face_array(upright.crop(predict.face_square(box)), [])
    np.testing.assert_array_equal(face, expected)
    assert (name, what) == (str(path), 'found face 0.98 at 150,60,54,70')


def test_a_face_at_the_edge_is_padded_not_shifted(tmp_path):
    """Beyond the photo the crop is black: the face keeps its place in the square."""
    path = photo(tmp_path / 'p.jpg')
    box = (-10.0, -20.0, 44.0, 50.5)
    [(_, face, _)] = predict.framed_faces([str(path)], stand_in({(400, 300): [(0.9, box)]}))
    left, top, _, _ = predict.face_square(box)
    assert left < 0 and top < 0
    assert face[:-top - 1, :].max() == 0  # the rows above the photo (the crop is 100 px)
    assert face[:, :-left - 1].max() == 0 and face[-top + 1:, -left + 1:].max() > 0


def test_the_finder_sees_the_photo_upright_by_its_exif(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation: the finder gets it
    upright, and the box it reports is a box of the upright photo."""
    rotated = photo(tmp_path / 'r.jpg', size=(400, 300), exif_orientation=6)  # 90 degrees
    box = (100.0, 150.0, 154.0, 220.5)
    find = stand_in({(300, 400): [(0.99, box)]})
    [(_, face, what)] = predict.framed_faces([str(rotated)], find)
    assert find.seen == [(300, 400)] and what.startswith('found face 0.99')
    upright = Image.open(rotated).transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(face, dataset.face_array(
        upright.crop(predict.face_square(box)), [])[0])


def test_no_face_several_faces_tiny_huge_and_grey_photos_each_get_their_line(tmp_path):
    paths = [photo(tmp_path / 'none.jpg'), photo(tmp_path / 'two.jpg', size=(600, 400)),
             photo(tmp_path / 'tiny.jpg', size=(12, 9)),
             photo(tmp_path / 'huge.jpg', size=(4000, 3000))]
    Image.fromarray(demo_data.draw_face(np.random.default_rng(1), 30, True)).save(
        tmp_path / 'grey.png')
    (tmp_path / 'notes.txt').write_text('not an image')
    files = [str(p) for p in paths] + [str(tmp_path / 'grey.png'), str(tmp_path / 'notes.txt')]
    two = [(0.99, (10.0, 10.0, 64.0, 80.5)), (0.95, (300.0, 100.0, 354.0, 170.5))]
    find = stand_in({(600, 400): two, (1600, 1200): [(0.9, (800.0, 600.0, 854.0, 670.5))],
                     (100, 100): [(0.97, (23.0, 11.0, 77.0, 81.5))]})
    rows = predict.framed_faces(files, find, all_faces=True)
    notes = {(os.path.basename(path), what) for path, _, what in rows}
    assert notes == {('none.jpg', 'no face found: centre crop'),
                     ('two.jpg', 'found face 0.99 at 10,10,54,70'),
                     ('two.jpg', 'found face 0.95 at 300,100,54,70'),
                     ('tiny.jpg', 'no face found: centre crop'),
                     ('huge.jpg', 'found face 0.90 at 2000,1500,135,176'),  # searched at 1600 px
                     ('grey.png', 'found face 0.97 at 23,11,54,70'),
                     ('notes.txt', "unreadable: UnidentifiedImageError: cannot identify image "
                                   f"file '{tmp_path / 'notes.txt'}'")}
    assert all(face is None or face.shape == (100, 100) for _, face, _ in rows)
    assert len(predict.framed_faces(files[1:2], find)) == 1  # without all_faces: the likeliest


def test_the_csv_and_the_table_say_what_was_done(trained, tmp_path, monkeypatch, capsys):
    paths = [photo(tmp_path / 'a.jpg'), photo(tmp_path / 'b.jpg', size=(200, 200))]
    monkeypatch.setattr(predict, 'face_finder',
                        lambda: stand_in({(400, 300): [(0.99, (150.0, 60.0, 204.0, 130.5))]}))
    out = tmp_path / 'ages.csv'
    assert predict.main(['--checkpoint', trained, '--images', *map(str, paths), '--find-face',
                         '--out', str(out), '--device', 'cpu']) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ['path', 'age', 'face']
    assert list(table['face']) == ['found face 0.99 at 150,60,54,70', 'no face found: centre crop']
    printed = capsys.readouterr().out
    assert 'found face 0.99 at 150,60,54,70' in printed and 'hint:' not in printed


@pytest.mark.parametrize('argv, message', [
    (['--data', 'x', '--find-face'], '--find-face works on --images'),
    (['--images', 'x', '--all-faces'], '--all-faces needs --find-face'),
    (['--images', 'x', '--find-face', '--all-faces', '--labels', 'y'], 'leave out --all-faces'),
])
def test_find_face_flags_that_cannot_work_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(['--checkpoint', 'c', *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_without_the_extra_find_face_says_how_to_install_it(trained, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(sys.modules, 'facenet_pytorch', None)  # as if not installed
    out = tmp_path / 'ages.csv'
    assert predict.main(['--checkpoint', trained, '--images', str(photo(tmp_path / 'a.jpg')),
                         '--find-face', '--out', str(out), '--device', 'cpu']) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith('error: --find-face needs the face finder, which is not installed')
    assert line.endswith('install it with: pip install --no-deps -r requirements-faces.txt')
    assert not out.exists()


def real_finder_installed():
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not real_finder_installed() and not os.environ.get('REQUIRE_FACE_FINDER'),
                    reason='the optional extra is not installed (.ci/run installs it)')
def test_the_real_finder_finds_no_drawn_face_and_falls_back_to_the_centre(tmp_path):
    """MTCNN (its weights from the wheel, nothing downloaded) runs on photos of every mode and
    size. It finds no face in the demo's drawn faces (they are too simple for it), so these take
    the no-face path: the centre square, said so in the row."""
    rng = np.random.default_rng(0)
    drawn = Image.fromarray(demo_data.draw_face(rng, 35, True)).resize((300, 300))
    scene = Image.new('RGB', (900, 600), (90, 120, 150))
    scene.paste(drawn.convert('RGB'), (400, 150))
    scene.save(tmp_path / 'scene.jpg')
    drawn.save(tmp_path / 'grey.png')
    Image.fromarray(np.uint16(np.full((50, 80), 30000))).save(tmp_path / 'deep.png')
    files = [str(tmp_path / n) for n in ('scene.jpg', 'grey.png', 'deep.png')]
    rows = predict.framed_faces(files, predict.face_finder())
    assert [what for _, _, what in rows] == ['no face found: centre crop'] * 3
    assert all(face.shape == (100, 100) for _, face, _ in rows)
