"""DXY pediatric diagnosis dialogues (dxy_dialog/): 527 consultations, 5 diseases, symptom annotations.

    python -m prepare.dxy [--src DIR]    ->  data/dxy/ (needs data/pretrain/tokenizer.model)

The file has two lines, `train [...]` and `test [...]`, each a Python literal (parsed with ast.literal_eval,
never eval). A record's dialog is the self report, then doctor and patient utterances in turn. Its symptom
slots (origin, explicit and implicit, present or not: a denied symptom is still a mentioned one) are the
record's own entity annotation. Validation: a seeded, disease-stratified 10% of the official train split.
Examples as for COVID; the first example of a consultation carries its disease id as label.
"""

import time

from prepare.dataset import arg_parser, build_example_set, check_out_writable, exit_on_data_error
from prepare.readers import dxy_splits
from prepare.sources import Skipped
from prepare.text import reading_for
from tokenizer import normalization_for


def main():
    started = time.time()
    args = arg_parser(__doc__, 'dxy').parse_args()
    check_out_writable(args.out)  # before reading: a read-only --out fails now, not after the work
    skipped = Skipped()
    with reading_for(normalization_for(args.tokenizer_model)):  # the text as its tokenizer will take it
        train, val, test, path = dxy_splits(args.src, skipped)
    diseases = sorted({r['disease'] for r in train + val + test})
    for r in train + val + test:
        r['label'] = diseases.index(r['disease'])
    build_example_set(args, {'train': train, 'val': val, 'test': test}, diseases, skipped, [path], started)


if __name__ == '__main__':
    exit_on_data_error(main)
