"""The default pretraining set from all sources -> data/pretrain/ (tokenizer included).

    python prepare/pretrain.py [--src DIR] [--tokenizer bpe|char|PATH/vocab.txt] [--vocab_size 8000]

Documents: COVID raw consultations (minus duplicates and minus the validation/test dialogues of the official
split), DXY and department QA training consultations (their validation/test parts stay out too), and the
medical book by chapter. Dialogues are written with speaker pieces ('<patient>…<doctor>…'), each document is
followed by <eot>. A seeded 5% of the documents is the validation split. The tokenizer is trained on the
training documents only; lexicon terms and DXY symptom slots give the entity tags.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python prepare/pretrain.py`

import numpy as np

from prepare import book, covid, department, dxy
from prepare.dataset import arg_parser, atomic_dir, exit_on_data_error, split_counts, write_meta, write_tokens
from prepare.lexicon import lexicon_dir, lexicon_files, read_lexicon
from prepare.sources import Skipped
from prepare.tagging import tag_texts
from prepare.text import dialogue_text
from prepare.tokenizer import SPECIALS, check_vocab_size, import_bert_vocab, train_bpe, train_char

VAL_FRACTION, SEED = 0.05, 1337


def read_documents(src, skipped):
    """[(text, extra entity terms)] from every source, the source paths, and the COVID dedupe report."""
    consultations, covid_report, covid_paths = covid.pretraining_consultations(src, skipped)
    dxy_train, _, _, dxy_path = dxy.dxy_splits(src, skipped)
    qa_splits, _, qa_path = department.department_splits(src, skipped)
    chapters, book_path = book.read_book(src)
    documents = ([(dialogue_text(turns), ()) for turns in consultations]
                 + [(dialogue_text(r['turns']), tuple(r['entities'])) for r in dxy_train]
                 + [(dialogue_text(r['turns']), ()) for r in qa_splits['train']]
                 + [(text, ()) for text in chapters])
    counts = {'covid': len(consultations), 'dxy': len(dxy_train), 'department': len(qa_splits['train']),
              'book': len(chapters)}
    print('documents:', counts)
    return documents, covid_paths + [dxy_path, qa_path, book_path], {'documents': counts, 'covid_raw': covid_report}


def training_lines(texts):
    """Tokenizer training text: lines without the special pieces (SentencePiece adds those itself)."""
    for text in texts:
        for special in SPECIALS:
            text = text.replace(special, '\n')
        yield from filter(None, text.split('\n'))


def concatenate(tagged, eot_id):
    """Documents one after the other, each followed by <eot> (tagged 0, 0)."""
    parts = [(np.append(ids, eot_id), np.append(lexical, 0), np.append(entity, 0)) for ids, lexical, entity in tagged]
    return [np.concatenate([p[k] for p in parts]) for k in range(3)]


def print_summary(counts, timings, skipped):
    for split, c in counts.items():
        lexical = ', '.join(f'{name} {100 * n / c["tokens"]:.1f}%' for name, n in c['lexical_tokens'].items())
        print(f'{split}: {c["records"]:,} documents, {c["tokens"]:,} tokens, {c["chars"] / c["tokens"]:.2f} chars/token, '
              f'entity {100 * c["entity_tokens"] / c["tokens"]:.1f}% of tokens; lexical: {lexical}')
    skipped.report()
    print('timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in timings.items()))


def main():
    started = time.time()
    parser = arg_parser(__doc__, 'pretrain', example_set=False)
    parser.add_argument('--tokenizer', default='bpe',
                        help="'bpe' (SentencePiece), 'char', or a BERT vocab.txt (GPT2-Chinese's, for continued pretraining)")
    parser.add_argument('--vocab_size', type=int, default=8000, help='must be < 65536 (ids are uint16)')
    parser.add_argument('--char_coverage', type=float, default=0.9995,
                        help='BPE: share of characters that get a piece; the rarest fall back to bytes')
    args = parser.parse_args()
    try:
        check_vocab_size(args.vocab_size)
    except ValueError as e:
        parser.error(str(e))
    skipped = Skipped()
    documents, source_paths, report = read_documents(args.src, skipped)
    lexicon = lexicon_dir(args.src)
    read_lexicon(lexicon, skipped)  # only to count and report the lexicon lines it leaves out
    order = np.random.default_rng(SEED).permutation(len(documents))
    n_val = int(round(len(documents) * VAL_FRACTION))
    splits = {'train': sorted(order[n_val:]), 'val': sorted(order[:n_val])}
    timings = {'read': time.time() - started}
    with atomic_dir(args.out) as folder:
        tokenizer_path = os.path.join(folder, 'tokenizer.model')
        train_lines = training_lines(documents[i][0] for i in splits['train'])
        if args.tokenizer not in ('bpe', 'char'):
            tok = import_bert_vocab(args.tokenizer, tokenizer_path)
        else:
            tok = (train_bpe(train_lines, tokenizer_path, args.vocab_size, args.char_coverage) if args.tokenizer == 'bpe'
                   else train_char(train_lines, tokenizer_path, args.vocab_size))
        timings['tokenizer'] = time.time() - started - sum(timings.values())
        tagged = tag_texts(documents, tokenizer_path, lexicon, args.entity_types, args.workers)
        timings['tag'] = time.time() - started - sum(timings.values())
        counts = {}
        for split, idx in splits.items():
            ids, lexical, entity = concatenate([tagged[i] for i in idx], tok.eot_id)
            write_tokens(folder, split, ids, lexical, entity)
            counts[split] = split_counts(tok, ids, lexical, entity, len(idx), [documents[i][0] for i in idx])
        timings['total'] = time.time() - started
        input_chars = sum(len(text) for text, _ in documents)
        write_meta(folder, tok, args.entity_types, counts, skipped, source_paths + lexicon_files(lexicon), timings,
                   **report, chars_per_s=round(input_chars / timings['tag']))
    print_summary(counts, timings, skipped)
    print(f'wrote {args.out}: tagged {input_chars:,} characters at {input_chars / timings["tag"]:,.0f} chars/s')


if __name__ == '__main__':
    exit_on_data_error(main)
