"""A pretraining set -> data/<name>/ (tokenizer included), streamed: memory does not grow with the corpus.

    python -m prepare.pretrain [--src DIR] [--tokenizer bpe|char|PATH/vocab.txt] [--vocab_size 8000]
    python -m prepare.pretrain --corpus PATH [PATH ...] --out data/NAME      # any corpus you have
    python -m prepare.pretrain --tokenizer=data/pretrain/tokenizer.model --train_chars=600000 --out data/small

--tokenizer=PATH/tokenizer.model reuses a tokenizer another set was built with (two pretraining sets that
fine-tune on the same example sets must share one); --train_chars keeps an even sample of about that many
characters of training text (experiments/reproduce.py compares general and medical pretraining on equal amounts).

Without --corpus: the default set from the shared sources: COVID raw consultations (minus duplicates and
minus the validation/test dialogues of the official split), DXY and department QA training consultations,
and the medical book by chapter. With --corpus: every file under the paths (prepare/corpus.py lists the
formats). Either way exact duplicates are dropped, no document holding a validation/test dialogue of a
fine-tuning set gets in (COVID-DDC, DXY, department QA and IMCS-21, read from their sources, and every example set
prepare/dialogues.py built beside --out or under data/, from its heldout.jsonl), and 5% of the documents (by a hash
of their text) are the validation split; prepare/stream.py does the work in two streaming passes on every core.
Dialogues are written with speaker pieces ('<patient>…<doctor>…'), each document followed by <eot>.
"""

import os
import shutil
import time
from collections import Counter

from prepare.corpus import corpus_files, file_encoding, read_corpus_file
from prepare.dataset import (
    arg_parser,
    atomic_dir,
    check_corpus_and_out,
    check_out_writable,
    exit_on_data_error,
    write_meta,
)
from prepare.heldout import HELD_OUT_FILE, HeldOut, example_sets_held_out
from prepare.readers import (
    COVID_SPLIT_FILES,
    covid_pretraining_consultations,
    department_splits,
    dxy_splits,
    imcs_splits,
    read_book,
    read_covid_split,
)
from prepare.sources import DataError, Skipped, source_file
from prepare.stream import SPLITS, spool, tag_and_write, thin_spool, tokenizer_sample
from prepare.text import dialogue_text, reading_for
from tagging import lexicon_dir, lexicon_files, read_lexicon
from tokenizer import Tokenizer, check_vocab_size, import_bert_vocab, normalization_for, train_bpe, train_char

VAL_FRACTION, SEED = 0.05, 1337


def default_documents(src, skipped, paths, report):
    """(source, text, entity terms, entity ids) of the default set; fills paths and report as it reads."""
    consultations, report['covid_raw'], covid_paths = covid_pretraining_consultations(src, skipped)
    dxy_train, _, _, dxy_path = dxy_splits(src, skipped)
    qa_splits, _, qa_path = department_splits(src, skipped)
    chapters, book_path = read_book(src)
    paths += covid_paths + [dxy_path, qa_path, book_path]
    yield from (('covid', dialogue_text(turns), (), None) for turns in consultations)
    yield from (('dxy', dialogue_text(r['turns']), tuple(r['entities']), None) for r in dxy_train)
    yield from (('department', dialogue_text(r['turns']), (), None) for r in qa_splits['train'])
    yield from (('book', text, (), None) for text in chapters)


def corpus_documents(corpus_paths, txt_document, encoding, skipped, paths, report):
    """(source file, text, entity terms, entity ids) of every file a user gave, file by file, streamed."""
    for path in corpus_files(corpus_paths):
        paths.append(path)
        report[path] = {}
        for document in read_corpus_file(path, skipped, report[path], txt_document, encoding):
            yield path, document.text, tuple(document.entity_terms), document.entity_chars


def held_out_dialogues(src, skipped):
    """The validation and test dialogues of every fine-tuning set: none may enter the pretraining text."""
    held_out = HeldOut()
    for split in ('val', 'test'):
        for turns in read_covid_split(source_file(COVID_SPLIT_FILES[split], src), skipped):
            held_out.add(dialogue_text(turns), 'covid')
    _, dxy_val, dxy_test, _ = dxy_splits(src, Skipped())  # (its skipped records count once, when read for text)
    qa_splits, _, _ = department_splits(src, Skipped())
    imcs_parts, _, _ = imcs_splits(src, Skipped())
    for name, records in (
        ('dxy', dxy_val + dxy_test),
        ('department', qa_splits['val'] + qa_splits['test']),
        ('imcs', imcs_parts['val'] + imcs_parts['test']),
    ):
        for r in records:
            held_out.add(dialogue_text(r['turns']), name)
    return held_out


def make_tokenizer(args, sample_lines, path):
    if args.tokenizer.endswith('.model'):  # a tokenizer this project wrote: copied as it is
        if not os.path.isfile(args.tokenizer):
            raise DataError(f"no tokenizer at {args.tokenizer}: build that data set first, or give 'bpe' or 'char'")
        shutil.copyfile(args.tokenizer, path)
        return Tokenizer.load(path)
    if args.tokenizer not in ('bpe', 'char'):
        return import_bert_vocab(args.tokenizer, path)
    if not sample_lines:
        raise DataError('no training text: every document was a duplicate, held out, or in the validation split')
    train = train_bpe if args.tokenizer == 'bpe' else train_char
    extra = (args.char_coverage,) if args.tokenizer == 'bpe' else ()
    return train(sample_lines, path, args.vocab_size, *extra)


def print_summary(counts, timings, skipped):
    for split, c in counts.items():
        lexical = ', '.join(f'{name} {100 * n / max(c["tokens"], 1):.1f}%' for name, n in c['lexical_tokens'].items())
        print(
            f'{split}: {c.get("records", 0):,} documents, {c.get("tokens", 0):,} tokens, '
            f'{c.get("chars", 0) / max(c.get("tokens", 0), 1):.2f} chars/token, '
            f'entity {100 * c.get("entity_tokens", 0) / max(c.get("tokens", 0), 1):.1f}% of tokens; '
            f'lexical: {lexical}'
        )
    skipped.report()
    print('timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in timings.items()))


def main():
    started = time.time()
    parser = arg_parser(__doc__, 'pretrain', example_set=False)
    parser.add_argument('--corpus', nargs='+', help='files or folders of your own corpus (default: the shared sources)')
    parser.add_argument(
        '--txt_document',
        choices=['block', 'line', 'file'],
        default='block',
        help='what one document of a .txt file is: a blank-line-separated block, a line, or the file',
    )
    parser.add_argument(
        '--encoding',
        default='',
        help="the corpus files' encoding, e.g. latin-1 (default: detect UTF-8, UTF-16 or GB18030)",
    )
    parser.add_argument(
        '--tokenizer',
        default='bpe',
        help="'bpe' (SentencePiece), 'char', a BERT vocab.txt (GPT2-Chinese's, for continued "
        "pretraining), or another data set's tokenizer.model (reused as it is)",
    )
    parser.add_argument('--vocab_size', type=int, default=8000, help='must be < 65536 (ids are uint16)')
    parser.add_argument(
        '--char_coverage',
        type=float,
        default=0.9995,
        help='BPE: share of characters that get a piece; the rarest fall back to bytes',
    )
    parser.add_argument(
        '--tokenizer_chars',
        type=int,
        default=4_000_000,
        help='the tokenizer trains on a seeded sample of about this many characters of training text',
    )
    parser.add_argument(
        '--train_chars',
        type=int,
        default=0,
        help='keep an even, hash-chosen sample of about this many training characters (0 = all)',
    )
    parser.add_argument('--chunk_docs', type=int, default=256, help='documents tagged per chunk (bounds memory)')
    args = parser.parse_args()
    try:
        check_vocab_size(args.vocab_size)
    except ValueError as e:
        parser.error(str(e))
    if args.train_chars < 0:
        parser.error(f'--train_chars must be >= 0 (0 = all), not {args.train_chars}')
    check_out_writable(args.out)
    if args.corpus:
        if args.encoding:  # an unknown name is refused before the work, not at the first file
            file_encoding(None, args.encoding)
        check_corpus_and_out(args.corpus, args.out)
    with reading_for(normalization_for(args.tokenizer)):  # the text as its tokenizer will take it
        build(args, started)


def build(args, started):
    """Read the documents, spool them, make the tokenizer, tag and write: the build of main()'s checked options."""
    skipped, paths, report = Skipped(), [], {}
    lexicon = lexicon_dir(args.src)
    read_lexicon(lexicon, skipped)  # only to count and report the lexicon lines it leaves out
    held_out = held_out_dialogues(args.src, skipped)
    n_built_in = len(held_out)
    user_sets = example_sets_held_out(held_out, [os.path.dirname(os.path.abspath(args.out)), 'data'], args.out)
    print(
        f'held out of the text: {n_built_in:,} validation/test dialogues of covid, dxy, department and imcs (from '
        f'their sources)' + ''.join(f', {n:,} of {folder} ({HELD_OUT_FILE})' for folder, n in user_sets.items())
    )
    if args.corpus:
        documents = corpus_documents(args.corpus, args.txt_document, args.encoding, skipped, paths, report)
    else:
        documents = default_documents(args.src, skipped, paths, report)
    timings = {}
    with atomic_dir(args.out) as folder:
        spool_path = os.path.join(folder, 'documents.spool.jsonl')
        per_source, n_documents, train_chars = spool(documents, spool_path, held_out, VAL_FRACTION)
        print('documents per source:', per_source)
        for split in SPLITS:  # train.py needs windows of both (a split is chosen by a hash of the text)
            if not any(count.get(split) for count in per_source.values()):
                raise DataError(
                    f'none of the {n_documents} documents kept went to the {split} split '
                    f'({VAL_FRACTION:.0%} go to val): give a larger corpus'
                )
        if args.train_chars:
            n_documents, train_chars = thin_spool(spool_path, train_chars, args.train_chars)
            print(
                f'kept {n_documents:,} documents, {train_chars:,} training characters '
                f'(--train_chars={args.train_chars:,})'
            )
        timings['read'] = time.time() - started
        tokenizer_path = os.path.join(folder, 'tokenizer.model')
        sample_lines = (
            tokenizer_sample(spool_path, train_chars, args.tokenizer_chars, SEED)
            if args.tokenizer in ('bpe', 'char')
            else []
        )
        tok = make_tokenizer(args, sample_lines, tokenizer_path)
        del sample_lines
        timings['tokenizer'] = time.time() - started - sum(timings.values())
        counts, chars_per_s = tag_and_write(
            spool_path,
            n_documents,
            folder,
            tok,
            (tokenizer_path, lexicon, args.entity_types),
            args.workers,
            args.chunk_docs,
        )
        os.remove(spool_path)
        timings['tag'] = time.time() - started - sum(timings.values())
        timings['total'] = time.time() - started
        write_meta(
            folder,
            tok,
            args.entity_types,
            counts,
            skipped,
            paths + lexicon_files(lexicon),
            timings,
            documents=per_source,
            held_out_dialogues=len(held_out),
            held_out_per_set=dict(Counter(held_out.names)),
            files=report,
            chars_per_s=round(chars_per_s),
            workers=args.workers,
            train_chars_wanted=args.train_chars,
        )
    print_summary(counts, timings, skipped)
    print(f'wrote {args.out}: tagged at {chars_per_s:,.0f} chars/s on {args.workers} worker(s)')


if __name__ == '__main__':
    exit_on_data_error(main)
