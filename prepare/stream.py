"""Building a pretraining data folder from a stream of documents: bounded memory, every core, the same bytes
for any number of workers.

Pass 1, spool: each document once, in input order. An exact duplicate (hash of its text) is dropped, and so
is a document that holds a validation/test dialogue of a fine-tuning set (prepare/heldout.py); both are
counted per source. The split is chosen by a hash of the text, so adding a source never moves a document
between splits. What is kept goes to a spool file on disk.
Thinning (optional): each training document of the spool kept with probability train_chars / training
characters, by a hash of its text (one independent of the split's), for a sample of a corpus of a given size
drawn evenly from every source; validation documents all stay.
Tokenizer sample: the spool's training lines, each kept with probability budget / training characters
(seeded), so that the tokenizer trains on about `budget` characters however large the corpus: its time and
memory are bounded too (SentencePiece's grow with its input).
Pass 2, tag and write: the spool is read back in chunks of chunk_docs documents; a chunk is tagged on a
process pool (map returns results in input order) and appended to its split's token and tag files. Memory
holds one chunk, the duplicate hashes (8 bytes of digest each, in a Python set) and the tokenizer sample.
"""

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from tagging import LEXICAL_MAP, init_worker, tag_job
from tokenizer import SPECIALS

SPLITS = ('train', 'val')
TAG_SUFFIX = {'ids': 'bin', 'lexical': 'lex.bin', 'entity': 'ent.bin'}


def split_of(digest, val_fraction):
    """'val' for a fixed share of texts, by the last 8 bytes of the text's digest (the first 8 are its identity)."""
    return 'val' if int.from_bytes(digest[8:], 'little') % 10_000 < val_fraction * 10_000 else 'train'


def training_lines(text):
    """Tokenizer training text: lines without the special pieces (SentencePiece adds those itself)."""
    for special in SPECIALS:
        text = text.replace(special, '\n')
    return [line for line in text.split('\n') if line]


def spool(documents, spool_path, held_out, val_fraction):
    """Pass 1. documents: (source name, text, entity terms, entity ids per character or None).
    Returns ({source: counts}, documents spooled, characters of the training documents)."""
    seen, counts = set(), {}
    n_spooled = train_chars = 0
    with open(spool_path, 'w', encoding='utf-8') as out:
        for source, text, terms, entity_chars in documents:
            count = counts.setdefault(source, Counter())
            count['read'] += 1
            digest = hashlib.blake2b(text.encode('utf-8'), digest_size=16).digest()
            if digest[:8] in seen:
                count['duplicates'] += 1
                continue
            seen.add(digest[:8])
            held = held_out.holds(text)
            if held is not None:
                count[f'held_out_{held}'] += 1
                continue
            split = split_of(digest, val_fraction)
            count[split] += 1
            gold = None if entity_chars is None else ''.join(map(str, entity_chars.tolist()))
            out.write(json.dumps(dict(split=split, text=text, terms=list(terms), gold=gold), ensure_ascii=False) + '\n')
            n_spooled += 1
            train_chars += len(text) if split == 'train' else 0
    return {source: dict(count) for source, count in counts.items()}, n_spooled, train_chars


def thin_spool(spool_path, train_chars, wanted_chars):
    """Keep about wanted_chars of the spool's training text (all of it when there is less); rewrites the
    spool. Returns (documents left, their training characters)."""
    keep = min(1.0, wanted_chars / max(train_chars, 1))
    n_kept = kept_chars = 0
    with open(spool_path, encoding='utf-8') as spooled, open(spool_path + '.thin', 'w', encoding='utf-8') as out:
        for line in spooled:
            record = json.loads(line)
            if record['split'] == 'train':
                digest = hashlib.blake2b(record['text'].encode('utf-8'), digest_size=8, person=b'thin').digest()
                if int.from_bytes(digest, 'little') / 2**64 >= keep:
                    continue
                kept_chars += len(record['text'])
            out.write(line)
            n_kept += 1
    os.replace(spool_path + '.thin', spool_path)
    return n_kept, kept_chars


def tokenizer_sample(spool_path, train_chars, budget, seed):
    """About `budget` characters of training lines, each line kept with the same seeded probability (all of
    them when the training text is smaller than the budget)."""
    keep = min(1.0, budget / max(train_chars, 1))
    rng = np.random.default_rng(seed)
    return [
        line
        for split, (text, _, _) in read_spool(spool_path)
        if split == 'train'
        for line in training_lines(text)
        if keep == 1.0 or rng.random() < keep
    ]


def read_spool(spool_path):
    """(split, (text, entity terms, entity ids or None)) per spooled document."""
    with open(spool_path, encoding='utf-8') as f:
        for line in f:
            record = json.loads(line)
            gold = None if record['gold'] is None else np.frombuffer(record['gold'].encode(), np.uint8) - ord('0')
            yield record['split'], (record['text'], tuple(record['terms']), gold)


def chunks(items, size):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class SplitFiles:
    """The split's token and tag files, appended to, and the counts meta.json reports."""

    def __init__(self, folder, split, tok):
        self.files = {key: open(os.path.join(folder, f"{split}.{suffix}"), 'wb') for key, suffix in TAG_SUFFIX.items()}
        self.char_counts, self.eot_id, self.unk_id = tok.char_counts(), tok.eot_id, tok.unk_id
        self.counts = Counter()
        self.lexical = np.zeros(len(LEXICAL_MAP), dtype=np.int64)

    def append(self, tagged, text):
        """One document, followed by <eot> (tagged 0, 0)."""
        ids, lexical, entity = (np.append(x, end) for x, end in zip(tagged, (self.eot_id, 0, 0)))
        self.files['ids'].write(ids.astype(np.uint16).tobytes())
        self.files['lexical'].write(lexical.astype(np.uint8).tobytes())
        self.files['entity'].write(entity.astype(np.uint8).tobytes())
        self.counts.update(
            tokens=len(ids),
            chars=int(self.char_counts[ids].sum()),
            records=1,
            input_chars=len(text),
            entity_tokens=int((entity > 0).sum()),
            unk_tokens=int((ids == self.unk_id).sum()),
        )
        self.lexical += np.bincount(lexical, minlength=len(LEXICAL_MAP))[: len(LEXICAL_MAP)]

    def close(self):
        for f in self.files.values():
            f.close()
        return dict(self.counts, lexical_tokens={name: int(self.lexical[i]) for name, i in LEXICAL_MAP.items()})


def tag_and_write(spool_path, n_documents, folder, tok, tagger_args, workers, chunk_docs):
    """Pass 2: returns the per-split counts and the tagging speed in characters per second."""
    outputs = {split: SplitFiles(folder, split, tok) for split in SPLITS}
    pool = multiprocessing.Pool(workers, initializer=init_worker, initargs=tagger_args) if workers > 1 else None
    if pool is None:
        init_worker(*tagger_args)
    started, n_chars = time.time(), 0
    try:
        with tqdm(total=n_documents, unit='doc', desc='tag', mininterval=1) as bar:
            for chunk in chunks(read_spool(spool_path), chunk_docs):
                jobs = [job for _, job in chunk]
                tagged = pool.map(tag_job, jobs, chunksize=8) if pool else list(map(tag_job, jobs))
                for (split, job), result in zip(chunk, tagged):
                    outputs[split].append(result, job[0])
                n_chars += sum(len(job[0]) for job in jobs)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{n_chars / max(time.time() - started, 1e-9):,.0f} chars/s", refresh=False)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {split: out.close() for split, out in outputs.items()}, n_chars / max(time.time() - started, 1e-9)
