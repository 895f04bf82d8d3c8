"""IMCS-21 (imcs21/), the pediatric consultations CMed-GPT fine-tunes on ("IMCS-IR"):

    python prepare/imcs.py [--src DIR] [--lexicon_entities] [--entity_types]   ->  data/imcs/

attr_dev.json: 203 dialogues with the disease label (`diagnosis`, 4 classes) and gold symptom mentions (one
B-/I-/O tag per character of each sentence); test.json: 408 dialogues without labels. Examples as for COVID,
one per doctor turn. Entity ids come from the gold BIO tags where a sentence has them (B/I -> 1; with
--entity_types, the symptom type), from lexicon matching elsewhere (the self reports, the unlabelled
dialogues); --lexicon_entities uses lexicon matching everywhere (to compare the two). Split: the labelled
dialogues, stratified by disease, 70/15/15 into train/val/test, so val and test hold labelled dialogues only;
the unlabelled ones go to train for dialogue generation, with label -1 (never classification examples).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python prepare/imcs.py`

from prepare.corpus import record_turns, tagged_dialogue
from prepare.dataset import arg_parser, build_example_set, exit_on_data_error, stratified_split
from prepare.sources import DataError, Skipped, read_text, source_file
from tagging import SYMPTOM

LABELLED, UNLABELLED = 'imcs21/attr_dev.json', 'imcs21/test.json'
FRACTIONS, SEED = {'val': 0.15, 'test': 0.15}, 1337


def read_imcs(path, skipped, gold=True, entity_types=False):
    """[dict(id, turns, entity_chars, diagnosis)] of one IMCS-21 file (an object of dialogues keyed by id)."""
    try:
        dialogues = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
    records = []
    for key, record in dialogues.items():
        shape, turns = record_turns(record)
        if shape != 'IMCS-21':
            skipped.add(path, f'dialogue {key}', 'not an IMCS-21 dialogue (no "dialogue" list)')
            continue
        if not gold:
            turns = [(speaker, text, None) for speaker, text, _ in turns]
        cleaned, entity_chars = tagged_dialogue(turns)
        if entity_chars is not None and entity_types:
            entity_chars = entity_chars * SYMPTOM  # IMCS-21 annotates symptoms
        records.append(dict(id=key, turns=cleaned, entity_chars=entity_chars, diagnosis=record.get('diagnosis')))
    return records


def imcs_splits(src, skipped, gold=True, entity_types=False):
    """{'train', 'val', 'test': [record]} and the disease names; val and test are labelled dialogues only."""
    paths = [source_file(LABELLED, src), source_file(UNLABELLED, src)]
    labelled = [r for r in read_imcs(paths[0], skipped, gold, entity_types) if r['diagnosis']]
    unlabelled = read_imcs(paths[1], skipped, gold, entity_types)
    diseases = sorted({r['diagnosis'] for r in labelled})
    parts = stratified_split([r['diagnosis'] for r in labelled], FRACTIONS, SEED)
    splits = {split: [dict(labelled[i], label=diseases.index(labelled[i]['diagnosis'])) for i in idx]
              for split, idx in parts.items()}
    splits['train'] += [dict(r, label=-1) for r in unlabelled]
    return splits, diseases, paths


def main():
    started = time.time()
    parser = arg_parser(__doc__, 'imcs')
    parser.add_argument('--lexicon_entities', action='store_true', help='entity ids by lexicon matching only')
    args = parser.parse_args()
    skipped = Skipped()
    splits, diseases, paths = imcs_splits(args.src, skipped, not args.lexicon_entities, args.entity_types)
    for records in splits.values():
        for r in records:
            r['entities'] = ()
    print({split: len(records) for split, records in splits.items()}, 'dialogues;', diseases)
    build_example_set(args, splits, diseases, skipped, paths, started, 'lexicon' if args.lexicon_entities else 'gold')


if __name__ == '__main__':
    exit_on_data_error(main)
