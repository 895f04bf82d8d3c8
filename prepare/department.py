"""Department QA (department_qa/im_sample_gb18030.csv, GB18030): internal-medicine questions with answers and
the answering department (11 departments, 3,121 ... 18 questions each).

    python prepare/department.py [--src DIR]    ->  data/department/ (needs data/pretrain/tokenizer.model)

One example per row: source = <patient> title <sep> ask <doctor>, target = answer <eot>, label = department
id. Split: seeded and stratified by department, 80/10/10, so that even the rare departments are in val/test.
"""
import csv
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python prepare/department.py`

from prepare.dataset import arg_parser, build_example_set, exit_on_data_error, stratified_split
from prepare.sources import DataError, Skipped, read_text, source_file
from prepare.text import clean

FILE = 'department_qa/im_sample_gb18030.csv'
ENCODING = 'gb18030'
COLUMNS = ['department', 'title', 'ask', 'answer']
FRACTIONS, SEED = {'val': 0.1, 'test': 0.1}, 1337


def read_department(path, skipped):
    """[dict(line, department, turns)] for the rows with four non-empty fields; the others are skipped."""
    reader = csv.reader(io.StringIO(read_text(path, ENCODING), newline=''))
    header = next(reader)
    if header != COLUMNS:
        raise DataError(f'{path}:1: expected the columns {",".join(COLUMNS)}, got {",".join(header)[:80]}')
    rows = []
    for row in reader:
        fields = [clean(x) for x in row]
        if len(fields) != len(COLUMNS) or not all(fields):
            skipped.add(path, reader.line_num, f'expected {len(COLUMNS)} non-empty fields, got {row!r:.60}')
            continue
        department, title, ask, answer = fields
        rows.append({'line': reader.line_num, 'department': department,
                     'turns': [('patient', f'{title}<sep>{ask}'), ('doctor', answer)]})
    return rows


def department_splits(src, skipped):
    """{'train', 'val', 'test': [row]}, the department names, and the source path."""
    path = source_file(FILE, src)
    # the file repeats some question-answer pairs word for word: split before removing them and a test
    # question would also be a training one. The first occurrence stays.
    rows, seen, read = [], set(), 0
    for row in read_department(path, skipped):
        read += 1
        text = row['turns'][0][1] + '<doctor>' + row['turns'][1][1]
        if text not in seen:
            seen.add(text)
            rows.append(row)
    print(f'department QA: {len(rows):,} distinct question-answer pairs of {read:,} rows ({read - len(rows)} repeats removed)')
    parts = stratified_split([r['department'] for r in rows], FRACTIONS, SEED)
    return {split: [rows[i] for i in idx] for split, idx in parts.items()}, sorted({r['department'] for r in rows}), path


def main():
    started = time.time()
    args = arg_parser(__doc__, 'department').parse_args()
    skipped = Skipped()
    splits, departments, path = department_splits(args.src, skipped)
    for rows in splits.values():
        for r in rows:
            r.update(entities=(), label=departments.index(r['department']))
    build_example_set(args, splits, departments, skipped, [path], started)


if __name__ == '__main__':
    exit_on_data_error(main)
