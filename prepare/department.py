"""Department QA (department_qa/im_sample_gb18030.csv, GB18030): internal-medicine questions with answers and
the answering department (11 departments, 3,121 ... 18 questions each).

    python -m prepare.department [--src DIR]    ->  data/department/ (needs data/pretrain/tokenizer.model)

One example per row: source = <patient> title <sep> ask <doctor>, target = answer <eot>, label = department
id. Split: seeded and stratified by department, 80/10/10, so that even the rare departments are in val/test.
"""

import time

from prepare.dataset import arg_parser, build_example_set, check_out_writable, exit_on_data_error
from prepare.readers import department_splits
from prepare.sources import Skipped
from prepare.text import reading_for
from tokenizer import normalization_for


def main():
    started = time.time()
    args = arg_parser(__doc__, 'department').parse_args()
    check_out_writable(args.out)  # before reading: a read-only --out fails now, not after the work
    skipped = Skipped()
    with reading_for(normalization_for(args.tokenizer_model)):  # the text as its tokenizer will take it
        splits, departments, path = department_splits(args.src, skipped)
    for rows in splits.values():
        for r in rows:
            r.update(entities=(), label=departments.index(r['department']))
    build_example_set(args, splits, departments, skipped, [path], started)


if __name__ == '__main__':
    exit_on_data_error(main)
