"""README.md and docs/: every relative link and anchor resolves, every file path named exists, every command's
script or module exists and takes the options the page gives it, and the model.py line ranges the README points
a reader to are the functions it names."""

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page):
    lines = page.read_text(encoding='utf-8').splitlines()
    return {github_anchor(line.lstrip('#')) for line in lines if re.match(r'#{1,6} ', line)}


def code_spans(page):
    """The lines of the page's code blocks, and its inline code (a span may wrap over prose lines)."""
    lines, prose, in_block = [], [], False
    for line in page.read_text(encoding='utf-8').splitlines():
        if line.startswith('```'):
            in_block = not in_block
        elif in_block:
            lines.append(line.split('  #')[0].strip())  # a command, without its comment
        else:
            prose.append(line.strip())
    return lines + re.findall(r'`([^`]+)`', ' '.join(prose))


def documented_commands():
    """{script path: {(page name, option), ...}} for every python/torchrun command on the pages."""
    commands = defaultdict(set)
    for page in PAGES:
        for span in code_spans(page):
            for command in span.split('&&'):
                found = re.match(r'\s*(?:python -m ([\w.]+)|python (\w+\.py)|torchrun .*?(train\.py))(.*)', command)
                if found:
                    module, script, torchrun_script, rest = found.groups()
                    path = module.replace('.', '/') + '.py' if module else script or torchrun_script
                    options = set(re.findall(r'(?<!\S)--(\w+)', rest)) - {'help'}
                    commands[path] |= {(page.name, option) for option in options} | {(page.name, None)}
    return commands


COMMANDS = documented_commands()


@pytest.mark.parametrize('page', PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_anchor_resolves(page):
    targets = [t for t in LINK.findall(page.read_text(encoding='utf-8')) if not t.startswith(('http://', 'https://'))]
    assert targets, f'{page.name} links to nothing'
    for target in targets:
        path, _, anchor = target.partition('#')
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f'{page.name}: {target} names no file'
        if anchor:
            assert anchor in anchors(linked), f'{page.name}: {target}: no such heading in {linked.name}'


@pytest.mark.parametrize('page', PAGES, ids=lambda page: page.name)
def test_every_project_path_named_exists(page):
    paths = re.findall(
        r'`((?:prepare|experiments|config|tests|docs)/\w+\.(?:py|md))`', page.read_text(encoding='utf-8')
    )
    for path in paths:
        assert (ROOT / path).exists(), f'{page.name} names {path}, which is not there'


def test_the_pages_give_commands():
    assert {'train.py', 'finetune.py', 'sample.py', 'eval.py', 'convert.py', 'prepare/pretrain.py'} <= set(COMMANDS)


@pytest.mark.parametrize('script', sorted(COMMANDS))
def test_every_command_takes_the_options_the_pages_give_it(script):
    assert (ROOT / script).is_file(), f'{script} (in {sorted({p for p, _ in COMMANDS[script]})}) is not there'
    module = ['-m', script[:-3].replace('/', '.')] if '/' in script else [script]
    result = subprocess.run([sys.executable, *module, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    usage = result.stdout + result.stderr  # (plot.py prints its usage line on stderr)
    assert 'usage' in usage and 'Traceback' not in usage, usage
    for page, option in sorted(COMMANDS[script], key=str):
        if option:
            assert re.search(rf'--{option}\b', usage), f'{page}: {script} has no --{option}'


def test_the_readme_points_at_the_model_functions_it_names():
    functions = {}
    for node in ast.parse((ROOT / 'model.py').read_text(encoding='utf-8')).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    functions[f'{node.name}.{item.name}'] = (item.lineno, item.end_lineno)
    rows = re.findall(
        r'^\| ((?:`\w+\.\w+`, )*`\w+\.\w+`), lines (\d+)–(\d+) \|',
        (ROOT / 'README.md').read_text(encoding='utf-8'),
        flags=re.M,
    )
    assert len(rows) >= 5
    for names, first, last in rows:
        names = re.findall(r'`(\w+\.\w+)`', names)
        assert all(name in functions for name in names), names
        # the range runs from the first function's def line to the last one's last line
        assert (functions[names[0]][0], functions[names[-1]][1]) == (int(first), int(last)), names
