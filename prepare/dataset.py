"""Shared by the per-source scripts: splits, example cutting and writing a data/<name>/ folder.

On disk: {split}.bin uint16 ids; {split}.lex.bin, {split}.ent.bin uint8 tags of the same
length; for example sets also {split}.mask.bin uint8 (1 on target tokens), {split}.offsets.npy int64 (N+1,)
and {split}.labels.npy int64 (N,); tokenizer.model; meta.json. A folder is built under a temporary name and
renamed into place at the end, so a failed build leaves the previous folder (or none), never half of one; a build
holds its folder (a lock file beside it), so two builds into one folder never run at once.
"""

import argparse
import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time

import numpy as np

from prepare.corpus import corpus_files
from prepare.sources import DataError, sha256
from prepare.text import dialogue_text
from tagging import LEXICAL_MAP, entity_map, lexicon_dir, lexicon_files, tag_texts
from tokenizer import Tokenizer


def stratified_split(labels, fractions, seed):
    """{split: sorted indices}. Within each label, a seeded shuffle; then round(n * fraction) indices go to each
    split named in fractions (e.g. {'val': 0.1, 'test': 0.1}) and the rest to 'train'."""
    rng = np.random.default_rng(seed)
    splits = {'train': [], **{name: [] for name in fractions}}
    for label in sorted(set(labels)):
        members = rng.permutation([i for i, x in enumerate(labels) if x == label]).tolist()
        start = 0
        for name, fraction in fractions.items():
            count = int(round(len(members) * fraction))
            splits[name] += members[start : start + count]
            start += count
        splits['train'] += members[start:]
    return {name: sorted(idx) for name, idx in splits.items()}


def cut_examples(ids, lexical, entity, tok, label=-1):
    """One example per doctor turn of a tagged dialogue: source = everything up to and including that <doctor>,
    target = its utterance + <eot>. Returns [(ids, lexical, entity, mask, label)], label on the first only."""
    speakers = np.flatnonzero((ids == tok.patient_id) | (ids == tok.doctor_id))
    examples = []
    for start, end in zip(speakers, list(speakers[1:]) + [len(ids)]):
        if ids[start] != tok.doctor_id:
            continue
        mask = np.zeros(end + 1, dtype=np.uint8)
        mask[start + 1 :] = 1
        examples.append(
            (
                np.append(ids[:end], tok.eot_id),
                np.append(lexical[:end], 0),
                np.append(entity[:end], 0),
                mask,
                label if not examples else -1,
            )
        )
    return examples


@contextlib.contextmanager
def atomic_dir(final, kind_file='meta.json', option='--out'):
    """Yield a fresh temporary folder; on success it replaces `final`, on failure it is removed.

    The build holds `final` for its whole length as a run holds its out_dir: an exclusive lock on the file
    .<name>.lock beside it, so a second build into the same folder is refused and never deletes the first
    one's work. An existing `final` is replaced only if it is a folder of the kind being built (it holds
    kind_file) or an empty one: an `option` that names any other folder is refused before the work starts."""
    final = os.path.normpath(final)  # 'data/x/' is 'data/x': its temporary folder goes beside it, not into it
    if os.path.basename(final) in ('', '.', '..'):
        raise DataError(f'{option} {final} names no folder of its own: give a new folder, e.g. {option} data/NAME')
    tmp, old = final + '.tmp', final + '.old'
    os.makedirs(os.path.dirname(final) or '.', exist_ok=True)
    with hold(os.path.join(os.path.dirname(final), f'.{os.path.basename(final)}.lock'), final, option):
        if os.path.exists(final) and not (
            os.path.isdir(final) and (os.path.isfile(os.path.join(final, kind_file)) or not os.listdir(final))
        ):
            raise DataError(
                f'{final} is not a folder this command built (no {kind_file} in it), and the build '
                f'replaces {option} whole: give {option} a new folder'
            )
        if os.path.exists(old):  # left by a build killed while it renamed: it is the build before
            raise DataError(
                f'{old} is left by an interrupted build and holds an earlier {final}: '
                + (f'delete it ({final} is the newer one)' if os.path.exists(final) else f'rename it back to {final}')
                + ', then build again'
            )
        shutil.rmtree(tmp, ignore_errors=True)  # a killed build's (this process holds the lock now)
        os.makedirs(tmp)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def check_corpus_and_out(corpus_paths, out):
    """Before any work: --out is replaced whole, so it must neither be nor hold nor lie in a corpus path (the
    build would delete the corpus, or read its own output), and its disk must have room for the spool and the
    token files (together about twice the corpus)."""
    out_real = os.path.realpath(out)
    for path in corpus_paths:
        real = os.path.realpath(path)
        if os.path.commonpath([out_real, real]) in (out_real, real):
            raise DataError(
                f'--out {out} and --corpus {path} overlap, and the build replaces --out whole: '
                f'give an --out outside every corpus path'
            )
    needed = 2 * sum(os.path.getsize(p) for p in corpus_files(corpus_paths))
    free = shutil.disk_usage(existing_parent(out_real)).free
    if free < needed:
        raise DataError(
            f'{out} is on a disk with {free / 1e9:.2f} GB free; building from this corpus needs about '
            f'{needed / 1e9:.2f} GB: free some space, or give --out on another disk'
        )


def check_out_writable(out):
    """Before any work: the build writes its temporary folder and lock beside --out and renames it into place, so
    the folder that holds --out (or, where that does not exist yet, the nearest folder that does) must be writable."""
    parent = existing_parent(os.path.dirname(os.path.abspath(out)))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(
            f'--out {out}: this process may not write in {parent} (a read-only disk or folder): '
            f'give --out in a folder you may write to'
        )


def existing_parent(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def hold(lock_path, final, option):
    """An exclusive lock on lock_path, released by the system when the process ends in any way (a killed build
    never leaves it stuck), as checkpoint.claim_out_dir holds a run's out_dir (that module loads torch, which
    prepare/ does without). Returns the open lock file: keep it referenced, or close it to release."""
    lock = open(lock_path, 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or 'pid unknown'
        lock.close()
        raise DataError(
            f'{final} is being built by another process ({holder}): wait for it to finish or give another {option}'
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}")
    lock.flush()
    return lock


def write_tokens(folder, split, ids, lexical, entity):
    assert ids.max(initial=0) < 65536
    ids.astype(np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    lexical.astype(np.uint8).tofile(os.path.join(folder, f'{split}.lex.bin'))
    entity.astype(np.uint8).tofile(os.path.join(folder, f'{split}.ent.bin'))


def write_examples(folder, split, examples):
    """Concatenate [(ids, lexical, entity, mask, label)] into the split's files."""
    ids, lexical, entity, mask, labels = zip(*examples)
    write_tokens(folder, split, np.concatenate(ids), np.concatenate(lexical), np.concatenate(entity))
    np.concatenate(mask).astype(np.uint8).tofile(os.path.join(folder, f'{split}.mask.bin'))
    np.save(os.path.join(folder, f'{split}.offsets.npy'), np.cumsum([0] + [len(x) for x in ids], dtype=np.int64))
    np.save(os.path.join(folder, f'{split}.labels.npy'), np.array(labels, dtype=np.int64))


def split_counts(tok, ids, lexical, entity, records, texts):
    """Counts for meta.json: tokens, characters (of the decoded text, specials excluded), tag distributions."""
    return {
        'tokens': len(ids),
        'chars': int(tok.char_counts()[ids].sum()),
        'records': records,
        'input_chars': sum(len(t) for t in texts),
        'entity_tokens': int((entity > 0).sum()),
        'unk_tokens': int((ids == tok.unk_id).sum()),
        'lexical_tokens': {name: int((lexical == i).sum()) for name, i in LEXICAL_MAP.items()},
    }


def write_meta(folder, tok, entity_types, splits, skipped, source_paths, timings, **extra):
    meta = {
        'vocab_size': tok.vocab_size,
        'special_ids': {'patient': tok.patient_id, 'doctor': tok.doctor_id, 'sep': tok.sep_id, 'eot': tok.eot_id},
        'tokenizer': {'kind': tok.kind, 'vocab_size': tok.vocab_size, 'file': 'tokenizer.model'},
        'lexical_map': LEXICAL_MAP,
        'entity_map': entity_map(entity_types),
        'splits': splits,
        'skipped': skipped.to_json(),
        'sources': {p: sha256(p) for p in source_paths},
        'timings_s': {k: round(v, 2) for k, v in timings.items()},
        **extra,
    }
    with open(os.path.join(folder, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)


def arg_parser(description, name, example_set=True):
    parser = argparse.ArgumentParser(prog=f'python -m prepare.{name}', description=description)
    if example_set:
        parser.add_argument(
            '--tokenizer_model',
            default=os.path.join('data', 'pretrain', 'tokenizer.model'),
            help='the pretraining tokenizer, copied into the output folder',
        )
    parser.add_argument('--src', help='source data folder (default: $CMED_DATA, else download into data/raw/)')
    parser.add_argument('--out', default=os.path.join('data', name), help='output folder')
    parser.add_argument(
        '--workers',
        type=int,
        default=len(os.sched_getaffinity(0)),
        help='processes for jieba tagging (default: every core this process may use)',
    )
    parser.add_argument('--entity_types', action='store_true', help='entity ids by type instead of 0/1')
    return parser


def build_example_set(args, splits, label_names, skipped, source_paths, started, entity_source='lexicon'):
    """Tag the dialogue records of each split with the pretraining tokenizer and write data/<name>/.
    splits: {split: [record]}, record = dict(turns=[(speaker, text)], entities=[...], label=int).
    entity_source ('lexicon', or 'gold' where the set's own labels give the entity ids) goes into meta.json."""
    if not os.path.exists(args.tokenizer_model):
        raise DataError(f'{args.tokenizer_model} not found: run `python -m prepare.pretrain` first')
    lexicon = lexicon_dir(args.src)
    tok = Tokenizer.load(args.tokenizer_model)
    timings = {'read': time.time() - started}
    with atomic_dir(args.out) as folder:
        shutil.copyfile(args.tokenizer_model, os.path.join(folder, 'tokenizer.model'))
        counts = {}
        for split, records in splits.items():
            texts = [dialogue_text(r['turns']) for r in records]
            jobs = [(text, r['entities'], r.get('entity_chars')) for text, r in zip(texts, records)]
            tagged = tag_texts(jobs, args.tokenizer_model, lexicon, args.entity_types, args.workers)
            examples = [ex for r, t in zip(records, tagged) for ex in cut_examples(*t, tok, r['label'])]
            if not examples:
                raise DataError(f'the {split} split of {args.out} would be empty: no dialogue with a doctor turn')
            write_examples(folder, split, examples)
            ids, lexical, entity = (np.concatenate([ex[k] for ex in examples]) for k in range(3))
            counts[split] = {
                **split_counts(tok, ids, lexical, entity, len(records), texts),
                'examples': len(examples),
                'target_tokens': int(sum(ex[3].sum() for ex in examples)),
            }
            print(f'{split}: {len(records):,} records, {len(examples):,} examples, {len(ids):,} tokens')
        timings['total'] = time.time() - started
        write_meta(
            folder,
            tok,
            args.entity_types,
            counts,
            skipped,
            source_paths + lexicon_files(lexicon),
            timings,
            label_names=label_names,
            entity_source=entity_source,
        )
    skipped.report()
    print(f'wrote {args.out} in {timings["total"]:.1f}s')


def exit_on_data_error(main):
    """Run a script's main: bad input ends it with the message (file and line), and a file it cannot read or
    write (a full or read-only disk, a folder it may not write to) with the system's, not a traceback."""
    try:
        main()
    except DataError as e:
        sys.exit(f'error: {e}')
    except OSError as e:  # the build's temporary folder is already removed (atomic_dir)
        hint = {
            errno.ENOSPC: ': free some space, or give --out on another disk',
            errno.EROFS: ': give --out on a writable disk',
        }.get(e.errno, '')
        sys.exit(f'error: {e}{hint}')
