"""DXY pediatric diagnosis dialogues (dxy_dialog/): 527 consultations, 5 diseases, symptom annotations.

    python prepare/dxy.py [--src DIR]    ->  data/dxy/ (needs data/pretrain/tokenizer.model)

The file has two lines, `train [...]` and `test [...]`, each a Python literal (parsed with ast.literal_eval,
never eval). A record's dialog is the self report, then doctor and patient utterances in turn. Its symptom
slots (origin, explicit and implicit, present or not: a denied symptom is still a mentioned one) are the
record's own entity annotation. Validation: a seeded, disease-stratified 10% of the official train split.
Examples as for COVID; the first example of a consultation carries its disease id as label.
"""
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python prepare/dxy.py`

from prepare.dataset import arg_parser, build_example_set, exit_on_data_error, stratified_split
from prepare.sources import DataError, Skipped, read_text, source_file
from prepare.text import clean

FILE = 'dxy_dialog/dxy_dialog_data_dialog_v2.txt'
VAL_FRACTION, SEED = 0.1, 1337


def read_dxy(path, skipped):
    """{'train': [record], 'test': [record]}, record = dict(turns, entities, disease)."""
    splits = {}
    for line_no, line in enumerate(read_text(path).split('\n'), start=1):
        if not line.strip():
            continue
        name, _, literal = line.partition(' ')
        if name not in ('train', 'test'):
            raise DataError(f'{path}:{line_no}: expected a line "train [...]" or "test [...]", got {line[:30]!r}')
        try:
            records = ast.literal_eval(literal)
        except (ValueError, SyntaxError) as e:
            raise DataError(f'{path}:{line_no}: the {name} list is not a Python literal ({e})') from e
        splits[name] = [r for r in (_record(path, line_no, n, x, skipped) for n, x in enumerate(records, 1)) if r]
    return splits


def _record(path, line_no, n, record, skipped):
    try:
        report, dialog, goal = clean(record['self_repo']), record['dialog'], record['goal']
        symptoms = list(goal.get('origin_inform_slots', [])) + [s for key in ('explicit_inform_slots',
                    'implicit_inform_slots') for s in goal.get(key, {})]
        disease = record['disease_tag']
        # the dialog repeats the self report as its first utterance
        utterances = dialog[1:] if dialog and clean(dialog[0]) == report else dialog
        turns = [('patient', report)] + [('doctor' if k % 2 == 0 else 'patient', clean(u))
                                         for k, u in enumerate(utterances)]
    except (KeyError, TypeError, AttributeError) as e:
        skipped.add(path, f'{line_no} record {n}', f'malformed DXY record ({type(e).__name__}: {e})')
        return None
    return {'turns': [(speaker, text) for speaker, text in turns if text], 'entities': symptoms, 'disease': disease}


def dxy_splits(src, skipped):
    """(train, val, test) record lists, and the source path."""
    path = source_file(FILE, src)
    official = read_dxy(path, skipped)
    train = official.get('train', [])
    parts = stratified_split([r['disease'] for r in train], {'val': VAL_FRACTION}, SEED)
    return [train[i] for i in parts['train']], [train[i] for i in parts['val']], official.get('test', []), path


def main():
    started = time.time()
    args = arg_parser(__doc__, 'dxy').parse_args()
    skipped = Skipped()
    train, val, test, path = dxy_splits(args.src, skipped)
    diseases = sorted({r['disease'] for r in train + val + test})
    for r in train + val + test:
        r['label'] = diseases.index(r['disease'])
    build_example_set(args, {'train': train, 'val': val, 'test': test}, diseases, skipped, [path], started)


if __name__ == '__main__':
    exit_on_data_error(main)
