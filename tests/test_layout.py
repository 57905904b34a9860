"""The project's shape, checked on its source: files in floors without a circle (each imports only
files below it, lazy imports inside functions included), dataset.py on the ground floor, and the
sizes a reader can take in one sitting.

    python -m pytest -q tests/test_layout.py
"""
import ast
import glob
import os

from conftest import ROOT

FILES = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, '*.py'))}


def project_imports(path):
    """The project files that `path` imports anywhere in it (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split('.')[0])
    return names & set(FILES)


def test_the_files_stand_in_floors_without_a_circle():
    imports = {name: project_imports(path) for name, path in FILES.items()}
    floor, placed = {}, set()
    while len(placed) < len(imports):  # a file's floor is one above the highest it imports
        ready = [n for n in imports if n not in placed and imports[n] <= placed]
        assert ready, f'a circle among {sorted(set(imports) - placed)}'
        for name in ready:
            floor[name] = 1 + max((floor[i] for i in imports[name]), default=0)
        placed |= set(ready)
    assert imports['dataset'] == set()  # the ground floor: every other file may use it
    assert 'train' not in imports['predict'] and 'predict' not in imports['train']
    assert not any('cv' in i for n, i in imports.items())  # nothing imports a script's command


def test_the_circle_check_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / 'x.py'
    path.write_text('def f():\n    import demo_data\n    from models import build_model\n')
    assert project_imports(str(path)) == {'demo_data', 'models'}


EPOCH = ('train_epoch', 'train_step', 'evaluate', 'record_epoch', 'save_epoch')


def files_one_epoch_uses():
    """The project files that the functions of one epoch in train.py (and the train.py functions
    they call, all the way down) name: `models.save_file` counts as models."""
    tree = ast.parse(open(FILES['train'], encoding='utf-8').read())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, seen, used = list(EPOCH), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Name) and node.id in functions:
                todo.append(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in FILES and node.value.id != 'train':
                used.add(node.value.id)
    return used


def test_one_epoch_uses_the_model_the_data_and_the_scores_only():
    """A student reads one epoch in train.py: the model and loss (models.py), the batch and its
    augmentation (dataset.py), the scores (metrics.py); signals reach it as an argument."""
    assert files_one_epoch_uses() == {'models', 'dataset', 'metrics'}


def test_sizes_a_student_reads_in_one_sitting():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        assert len(f.readlines()) <= 250
    with open(FILES['train'], encoding='utf-8') as f:
        assert len(f.readlines()) <= 600
    for name, path in FILES.items():
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, f'{name}.{node.name}'
