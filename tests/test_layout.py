"""The layout's import rules, read from the source with ast (every import, inside functions too): no import
circles among the project's modules, no module imports a script (a file with a __main__ block), and no module
edits sys.path (scripts run from the repository root: python train.py, python -m prepare.pretrain)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ('', 'prepare', 'experiments')
# a module first, with a small command line of its own: reproduce.py imports its model
MODULES_WITH_A_COMMAND_LINE = {'experiments.ngram'}


def project_modules():
    """{module name: source} of every .py file at the top level, in prepare/ and in experiments/."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob('*.py')):
            name = path.stem if not folder else folder if path.stem == '__init__' else f'{folder}.{path.stem}'
            modules[name] = path.read_text(encoding='utf-8')
    return modules


def imported(source, modules):
    """The project modules a source imports ('from prepare import readers' imports prepare.readers)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.update(
                f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
                for alias in node.names
            )
    return names & modules.keys() - set(FOLDERS)


def import_graph():
    modules = project_modules()
    return {name: imported(source, modules) - {name} for name, source in modules.items()}, modules


def test_no_import_circles():
    graph, _ = import_graph()
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import circle: {' -> '.join(path[path.index(name) :] + [name])}"
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_module_imports_a_script():
    graph, modules = import_graph()
    scripts = {name for name, source in modules.items() if "if __name__ == '__main__':" in source}
    assert {'train', 'prepare.pretrain', 'prepare.covid', 'experiments.reproduce'} <= scripts  # the check sees them
    wrong = sorted(
        f'{name} imports {target}'
        for name, targets in graph.items()
        for target in targets & (scripts - MODULES_WITH_A_COMMAND_LINE)
    )
    assert not wrong, wrong


def test_no_module_edits_sys_path():
    _, modules = import_graph()
    assert not [
        name
        for name, source in modules.items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == 'path' and getattr(node.value, 'id', '') == 'sys'
    ]
