"""IMCS-21 (imcs21/), the pediatric consultations CMed-GPT fine-tunes on ("IMCS-IR"):

    python -m prepare.imcs [--src DIR] [--lexicon_entities] [--entity_types]   ->  data/imcs/

attr_dev.json: 203 dialogues with the disease label (`diagnosis`, 4 classes) and gold symptom mentions (one
B-/I-/O tag per character of each sentence); test.json: 408 dialogues without labels. Examples as for COVID,
one per doctor turn. Entity ids come from the gold BIO tags where a sentence has them (B/I -> 1; with
--entity_types, the symptom type), from lexicon matching elsewhere (the self reports, the unlabelled
dialogues); --lexicon_entities uses lexicon matching everywhere (to compare the two). Split: the labelled
dialogues, stratified by disease, 70/15/15 into train/val/test, so val and test hold labelled dialogues only;
the unlabelled ones go to train for dialogue generation, with label -1 (never classification examples).
"""

import time

from prepare.dataset import arg_parser, build_example_set, check_out_writable, exit_on_data_error
from prepare.readers import imcs_splits
from prepare.sources import Skipped
from prepare.text import reading_for
from tokenizer import normalization_for


def main():
    started = time.time()
    parser = arg_parser(__doc__, 'imcs')
    parser.add_argument('--lexicon_entities', action='store_true', help='entity ids by lexicon matching only')
    args = parser.parse_args()
    check_out_writable(args.out)  # before reading: a read-only --out fails now, not after the work
    skipped = Skipped()
    with reading_for(normalization_for(args.tokenizer_model)):  # the text as its tokenizer will take it
        splits, diseases, paths = imcs_splits(args.src, skipped, not args.lexicon_entities, args.entity_types)
    for records in splits.values():
        for r in records:
            r['entities'] = ()
    print({split: len(records) for split, records in splits.items()}, 'dialogues;', diseases)
    build_example_set(args, splits, diseases, skipped, paths, started, 'lexicon' if args.lexicon_entities else 'gold')


if __name__ == '__main__':
    exit_on_data_error(main)
