"""COVID-DDC (covid_dialog_zh/): the raw dump for pretraining, the official 870/109/109 split for fine-tuning.

    python -m prepare.covid [--src DIR]    ->  data/covid/ (needs data/pretrain/tokenizer.model)

Examples: one per doctor turn of each split dialogue (source = the dialogue so far, target = the doctor's
utterance); no labels. The raw dump's consultations that are validation/test dialogues are removed from the
pretraining text (readers.covid_pretraining_consultations), so test perplexity is measured on unseen dialogues.
"""

import time

from prepare.dataset import arg_parser, build_example_set, check_out_writable, exit_on_data_error
from prepare.readers import COVID_SPLIT_FILES, read_covid_split
from prepare.sources import Skipped, source_file
from prepare.text import reading_for
from tokenizer import normalization_for


def main():
    started = time.time()
    args = arg_parser(__doc__, 'covid').parse_args()
    check_out_writable(args.out)  # before reading: a read-only --out fails now, not after the work
    skipped = Skipped()
    paths = {split: source_file(rel, args.src) for split, rel in COVID_SPLIT_FILES.items()}
    with reading_for(normalization_for(args.tokenizer_model)):  # the text as its tokenizer will take it
        splits = {
            split: [{'turns': turns, 'entities': (), 'label': -1} for turns in read_covid_split(path, skipped)]
            for split, path in paths.items()
        }
    build_example_set(args, splits, [], skipped, list(paths.values()), started)


if __name__ == '__main__':
    exit_on_data_error(main)
