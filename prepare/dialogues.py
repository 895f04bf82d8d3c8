"""Your own consultations -> an example set in data/<name>/, in the built-in sets' form (data/covid), streamed.

    python -m prepare.dialogues --corpus PATH [PATH ...] --out data/NAME        # files or folders (recursive)
    python -m prepare.dialogues --corpus qa.csv --label_field=department --out data/NAME    # + a class label

Reads every dialogue shape prepare/corpus.py reads: ShareGPT, instruction records, questions/answers, lists of
病人：/医生： utterances, CHIP-MDCFNPC, IMCS-21 JSON, MedDialog-CN .txt dumps and question-answer CSV tables (plain
text is refused: it has no doctor's reply to learn). Examples as the built-in sets': one per doctor turn, source =
the dialogue so far up to that turn's <doctor>, target = the doctor's utterance + <eot>, the loss mask on the
target; finetune.py crops a long source from the left, as for every set.

Pass 1 reads the files in order, drops exact duplicate dialogues (counted), puts each dialogue in train, val or test
by a hash of its text (--val_fraction, --test_fraction: adding dialogues to a corpus never moves one between
splits) and spools it to disk. Pass 2 reads the spool back in chunks of --chunk_docs dialogues, tags a chunk on
--workers processes (map keeps the input order: the same bytes for any worker count and chunk size) and appends
its examples to the split's files. Memory holds one chunk, 8 bytes of hash per dialogue and the offset and label
of each example.

The tokenizer is a pretraining set's (--tokenizer, default data/pretrain/tokenizer.model): a fine-tuned model reads
the ids its base was pretrained on, so this build never trains one. Entity ids come from a dialogue's own
annotations where it has them (CHIP-MDCFNPC `ner` ranges, IMCS-21 `BIO_label`), else from the lexicon.
--label_field=KEY labels each dialogue with the record's field KEY (the label names, sorted, are meta.json's
label_names; finetune.py --task=classify reads them); a record without it is skipped and counted with file:line.
The validation and test dialogues go to heldout.jsonl in the set's folder: every later `python -m prepare.pretrain`
whose --out is beside the set, or that runs where the set is under data/, leaves them out of its text.
"""

import array
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from prepare.corpus import corpus_files, file_encoding, read_corpus_file
from prepare.dataset import (
    arg_parser,
    atomic_dir,
    check_corpus_and_out,
    check_out_writable,
    cut_examples,
    exit_on_data_error,
    write_meta,
)
from prepare.heldout import HELD_OUT_FILE
from prepare.sources import DataError, Skipped
from prepare.stream import chunks
from prepare.text import reading_for
from tagging import LEXICAL_MAP, init_worker, lexicon_dir, lexicon_files, tag_job
from tokenizer import Tokenizer, normalization_for

SPLITS = ('train', 'val', 'test')
DEFAULT_TOKENIZER = os.path.join('data', 'pretrain', 'tokenizer.model')
PLAIN_TEXT = ('text', 'plain text')  # what corpus.py calls a file (or record) of text without speakers


def split_of(digest, val_fraction, test_fraction):
    """'val', 'test' or 'train', by the last 8 bytes of the dialogue's digest (the first 8 are its identity)."""
    share = int.from_bytes(digest[8:], 'little') / 2**64
    return 'val' if share < val_fraction else 'test' if share < val_fraction + test_fraction else 'train'


def read_dialogues(paths, label_field, encoding, skipped, files):
    """(Document, label or None) of every dialogue in the files, in order, streamed; files gets each file's report
    (shape, encoding, records). A dialogue without a doctor turn, or without the label field, is skipped and
    counted; plain text stops the build."""
    for path in corpus_files(paths):
        report = files[path] = {}
        for document in read_corpus_file(path, skipped, report, 'block', encoding):
            where = f'record {document.line}' if path.endswith('.json') else document.line
            if report['shape'].startswith(PLAIN_TEXT):
                raise DataError(
                    f'{path}:{where}: {report["shape"]}, not a dialogue: give dialogues (ShareGPT, instruction, '
                    f'CHIP-MDCFNPC, IMCS-21, MedDialog... see docs/data.md), or pretrain on text with '
                    f'`python -m prepare.pretrain --corpus`'
                )
            if '<doctor>' not in document.text:
                skipped.add(path, where, 'a dialogue without a doctor turn (no reply to learn)')
                continue
            label = None
            if label_field:
                label = (document.fields or {}).get(label_field)
                if label is None or isinstance(label, (dict, list)) or not str(label).strip():
                    skipped.add(path, where, f'no value of the label field {label_field!r} (--label_field)')
                    continue
                label = str(label).strip()
            yield document, label


def spool(dialogues, folder, fractions):
    """Pass 1: each new dialogue, with its split, to the spool; the val and test ones to HELD_OUT_FILE too.
    Returns ({file: counts}, the label names (sorted))."""
    seen, counts, labels = set(), {}, set()
    with (
        open(os.path.join(folder, 'dialogues.spool.jsonl'), 'w', encoding='utf-8') as out,
        open(os.path.join(folder, HELD_OUT_FILE), 'w', encoding='utf-8') as held_out,
    ):
        for document, label in dialogues:
            count = counts.setdefault(document.source, Counter())
            count['read'] += 1
            digest = hashlib.blake2b(document.text.encode('utf-8'), digest_size=16).digest()
            if digest[:8] in seen:
                count['duplicates'] += 1
                continue
            seen.add(digest[:8])
            split = split_of(digest, *fractions)
            count[split] += 1
            labels.add(label)
            gold = None if document.entity_chars is None else ''.join(map(str, document.entity_chars.tolist()))
            if gold is not None:  # entity ids from the data's own annotations
                count['annotated'] += 1
            out.write(json.dumps(dict(split=split, text=document.text, gold=gold, label=label), ensure_ascii=False))
            out.write('\n')
            if split != 'train':
                held_out.write(json.dumps(dict(split=split, text=document.text), ensure_ascii=False) + '\n')
    return {path: dict(count) for path, count in counts.items()}, sorted(labels - {None})


def read_spool(folder):
    """(split, label, tagging job (text, extra entity terms, entity ids per character or None)) per dialogue."""
    with open(os.path.join(folder, 'dialogues.spool.jsonl'), encoding='utf-8') as f:
        for line in f:
            record = json.loads(line)
            gold = None if record['gold'] is None else np.frombuffer(record['gold'].encode(), np.uint8) - ord('0')
            yield record['split'], record['label'], (record['text'], (), gold)


class ExampleFiles:
    """One split's example files (prepare/dataset.py's form), appended to a dialogue at a time, and its counts."""

    SUFFIXES = {'bin': np.uint16, 'lex.bin': np.uint8, 'ent.bin': np.uint8, 'mask.bin': np.uint8}

    def __init__(self, folder, split, tok):
        self.folder, self.split = folder, split
        self.files = {suffix: open(os.path.join(folder, f'{split}.{suffix}'), 'wb') for suffix in self.SUFFIXES}
        self.offsets, self.labels = array.array('q', [0]), array.array('q')
        self.char_counts, self.unk_id = tok.char_counts(), tok.unk_id
        self.counts = Counter()
        self.lexical = np.zeros(len(LEXICAL_MAP), dtype=np.int64)

    def append(self, examples, text):
        """The examples (ids, lexical, entity, mask, label) of one dialogue, whose text is `text`."""
        for ids, lexical, entity, mask, label in examples:
            for (suffix, dtype), values in zip(self.SUFFIXES.items(), (ids, lexical, entity, mask)):
                self.files[suffix].write(values.astype(dtype).tobytes())
            self.offsets.append(self.offsets[-1] + len(ids))
            self.labels.append(label)
            self.counts.update(
                examples=1,
                tokens=len(ids),
                chars=int(self.char_counts[ids].sum()),
                entity_tokens=int((entity > 0).sum()),
                unk_tokens=int((ids == self.unk_id).sum()),
                target_tokens=int(mask.sum()),
            )
            self.lexical += np.bincount(lexical, minlength=len(LEXICAL_MAP))[: len(LEXICAL_MAP)]
        self.counts.update(records=1, input_chars=len(text))

    def close(self):
        for f in self.files.values():
            f.close()
        np.save(os.path.join(self.folder, f'{self.split}.offsets.npy'), np.array(self.offsets, dtype=np.int64))
        np.save(os.path.join(self.folder, f'{self.split}.labels.npy'), np.array(self.labels, dtype=np.int64))
        return dict(self.counts, lexical_tokens={name: int(self.lexical[i]) for name, i in LEXICAL_MAP.items()})


def tag_and_write(folder, splits, n_dialogues, tok, tagger_args, label_ids, workers, chunk_docs):
    """Pass 2: the examples of every spooled dialogue into its split's files. Returns (counts per split, chars/s)."""
    outputs = {split: ExampleFiles(folder, split, tok) for split in splits}
    pool = multiprocessing.Pool(workers, initializer=init_worker, initargs=tagger_args) if workers > 1 else None
    if pool is None:
        init_worker(*tagger_args)
    started, n_chars = time.time(), 0
    try:
        with tqdm(total=n_dialogues, unit='dialogue', desc='tag', mininterval=1) as bar:
            for chunk in chunks(read_spool(folder), chunk_docs):
                jobs = [job for _, _, job in chunk]
                tagged = pool.map(tag_job, jobs, chunksize=8) if pool else list(map(tag_job, jobs))
                for (split, label, job), result in zip(chunk, tagged):
                    outputs[split].append(cut_examples(*result, tok, label_ids.get(label, -1)), job[0])
                n_chars += sum(len(job[0]) for job in jobs)
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {split: out.close() for split, out in outputs.items()}, n_chars / max(time.time() - started, 1e-9)


def tokenizer_path(given):
    """The tokenizer to reuse: --tokenizer, else data/pretrain's; a clear error when there is none."""
    path = given or DEFAULT_TOKENIZER
    if not os.path.isfile(path):
        raise DataError(
            f'no tokenizer at {path}: give --tokenizer=data/<set>/tokenizer.model of the pretraining set your base '
            f'model was trained on, or build data/pretrain first (`python -m prepare.pretrain`)'
        )
    try:
        Tokenizer.load(path)
    except (RuntimeError, ValueError, KeyError, UnicodeDecodeError) as e:  # not a file this project wrote
        raise DataError(f'{path} is not a tokenizer.model that prepare/ wrote ({e}): give another --tokenizer') from e
    print(f'tokenizer: {path}' + ('' if given else " (the default: data/pretrain's; --tokenizer=PATH for another)"))
    return path


def parse_args(argv):
    parser = arg_parser(__doc__, 'dialogues', example_set=False)
    parser.add_argument('--corpus', nargs='+', required=True, help='files or folders of dialogues')
    parser.add_argument('--tokenizer', default='', help=f'a pretraining set\'s tokenizer.model ({DEFAULT_TOKENIZER})')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='share of dialogues in val (by hash)')
    parser.add_argument('--test_fraction', type=float, default=0.1, help='share of dialogues in test (0 = none)')
    parser.add_argument('--label_field', default='', help="a record's field that labels it, e.g. department")
    parser.add_argument(
        '--encoding', default='', help="the corpus files' encoding (default: detect UTF-8, UTF-16 or GB18030)"
    )
    parser.add_argument('--chunk_docs', type=int, default=256, help='dialogues tagged per chunk (bounds memory)')
    args = parser.parse_args(argv)
    for name in ('val_fraction', 'test_fraction'):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f'--{name} must be in [0, 1), not {getattr(args, name)}')
    if args.val_fraction + args.test_fraction >= 1:
        parser.error('--val_fraction + --test_fraction must leave some dialogues for train (sum < 1)')
    if args.workers < 1 or args.chunk_docs < 1:
        parser.error(f'--workers and --chunk_docs must be >= 1, not {args.workers} and {args.chunk_docs}')
    return args


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    if args.encoding:  # an unknown name is refused before the work, not at the first file
        file_encoding(None, args.encoding)
    check_out_writable(args.out)
    check_corpus_and_out(args.corpus, args.out)
    tokenizer = tokenizer_path(args.tokenizer)
    lexicon = lexicon_dir(args.src)
    skipped, files, fractions = Skipped(), {}, (args.val_fraction, args.test_fraction)
    splits = ['train'] + [split for split, fraction in zip(SPLITS[1:], fractions) if fraction]
    with reading_for(normalization_for(tokenizer)), atomic_dir(args.out) as folder:  # text as the tokenizer takes it
        dialogues = read_dialogues(args.corpus, args.label_field, args.encoding, skipped, files)
        per_file, label_names = spool(dialogues, folder, fractions)
        total = Counter(dict.fromkeys(('read', 'duplicates', *splits, 'annotated'), 0))
        for count in per_file.values():
            total.update(count)
        print(
            f'{total["read"]:,} dialogues read from {len(files)} file(s), {total["duplicates"]:,} exact duplicates '
            f'dropped; ' + ', '.join(f'{split} {total[split]:,}' for split in splits)
        )
        check_splits(total, splits, files, skipped)
        shutil.copyfile(tokenizer, os.path.join(folder, 'tokenizer.model'))
        tok = Tokenizer.load(os.path.join(folder, 'tokenizer.model'))
        timings = {'read': time.time() - started}
        counts, chars_per_s = tag_and_write(
            folder,
            splits,
            sum(total[split] for split in splits),
            tok,
            (os.path.join(folder, 'tokenizer.model'), lexicon, args.entity_types),
            {name: i for i, name in enumerate(label_names)},
            args.workers,
            args.chunk_docs,
        )
        os.remove(os.path.join(folder, 'dialogues.spool.jsonl'))
        timings.update(tag=time.time() - started - timings['read'], total=time.time() - started)
        write_meta(
            folder,
            tok,
            args.entity_types,
            counts,
            skipped,
            list(files) + lexicon_files(lexicon),
            timings,
            label_names=label_names,
            label_field=args.label_field,
            entity_source='annotations where given, else lexicon' if total['annotated'] else 'lexicon',
            dialogues=dict(total, per_file=per_file),
            files=files,
            split=dict(
                by='hash of the dialogue text', val_fraction=args.val_fraction, test_fraction=args.test_fraction
            ),
            tokenizer_from=tokenizer,
            held_out_file=HELD_OUT_FILE,
            chars_per_s=round(chars_per_s),
            workers=args.workers,
        )
    print_summary(args, counts, label_names, skipped, total, timings, chars_per_s)


def check_splits(total, splits, files, skipped):
    """Every split asked for holds a dialogue, or a one-line error (after the malformed records, which may say why)."""
    if not sum(total[split] for split in splits):
        skipped.report()
        first = f' (the first record skipped: {skipped.where[0]})' if len(skipped) else ''
        raise DataError(f'no dialogue to cut examples from in {", ".join(files)}{first}: give a corpus of dialogues')
    for split in splits:
        if not total[split]:
            fix = '' if split == 'train' else f', or --{split}_fraction=0 for no {split} split'
            raise DataError(
                f'none of the {sum(total[s] for s in splits)} dialogues went to the {split} split (by hash): give a '
                f'larger corpus{fix}'
            )


def print_summary(args, counts, label_names, skipped, total, timings, chars_per_s):
    for split, c in counts.items():
        print(
            f'{split}: {c["records"]:,} dialogues, {c["examples"]:,} examples, {c["tokens"]:,} tokens '
            f'({c["target_tokens"]:,} target), entity {100 * c["entity_tokens"] / max(c["tokens"], 1):.1f}% of tokens'
        )
    if label_names:
        print(f'{len(label_names)} labels ({args.label_field}): {", ".join(label_names[:20])}')
    skipped.report()
    held_out = total['val'] + total['test']
    print(
        f'{held_out:,} validation/test dialogues in {os.path.join(args.out, HELD_OUT_FILE)}: a later '
        f'`python -m prepare.pretrain` leaves them out when its --out is in the same folder or this set is under data/'
    )
    print(
        f'wrote {args.out} in {timings["total"]:.1f}s: tagged at {chars_per_s:,.0f} chars/s on {args.workers} worker(s)'
    )


if __name__ == '__main__':
    exit_on_data_error(main)
