"""Per-token tags aligned to the tokenizer's ids: a lexical class and an entity id.

Lexical class, from jieba's part-of-speech tag (ICTCLAS tag set) by its first letter; a token takes the class
of the jieba word holding the token's first character:
    n...  noun       n, nr (person), ns (place), nt (organisation), nz (other proper noun), ng, nrt, nrfg
    v...  verb       v, vd, vg, vi, vn (verbal noun: jieba tags 检查 vn), vq
    a...  adjective  a, ad, ag, an
    else  other (0)  m numeral, q, r pronoun, d adverb, p, c, u particle, x punctuation, eng, t, f, s, ...
Lexicon terms unknown to jieba are added to it as nouns, so segmentation and entities agree.

Entity id, per character then taken at each token's first character: longest match (forward maximum
matching) against the medical lexicon, overridden by the record's own annotation (DXY symptom slots, as
symptoms). 0/1 by default (the paper's one-hot positions); with entity_types, the type id (ENTITY_TYPES).
Special pieces (speakers, separator, end of text) always get 0 for both.

The medical lexicon (medical_lexicon/<type>.txt, one term per line) is both the entity dictionary and jieba's
user words; sample.py, eval.py and the fine-tuning tasks load it as prepare/ does, so tags agree at run time.
"""

import functools
import logging
import multiprocessing
import os

import jieba
import jieba.posseg
import numpy as np
from tqdm import tqdm

from prepare.sources import read_text, source_file
from prepare.text import normalize
from tokenizer import Tokenizer

# a term listed in two files takes the type of the earlier one (427 terms are both symptom and disease)
ENTITY_TYPES = ['symptom', 'disease', 'drug', 'check', 'department']
LEXICAL_MAP = {'other': 0, 'noun': 1, 'verb': 2, 'adjective': 3}
_LEXICAL_OF_LETTER = {'n': 1, 'v': 2, 'a': 3}
SYMPTOM = 1 + ENTITY_TYPES.index('symptom')


def entity_map(entity_types=False):
    names = ENTITY_TYPES if entity_types else ['entity']
    return {'none': 0, **{name: i for i, name in enumerate(names, start=1)}}


def lexicon_dir(src=None):
    """The folder holding all lexicon files (downloaded into data/raw/ if they are not in the source folder)."""
    folders = {os.path.dirname(source_file(f'medical_lexicon/{name}.txt', src)) for name in ENTITY_TYPES}
    if len(folders) > 1:
        raise FileNotFoundError(f'lexicon files are split across {sorted(folders)}: put them in one folder')
    return folders.pop()


def lexicon_files(folder):
    return [os.path.join(folder, f'{name}.txt') for name in ENTITY_TYPES]


def read_lexicon(folder, skipped=None, normalize=normalize):
    """{term: type id} with type ids 1..5 in ENTITY_TYPES order, each term normalised as the tokenizer normalises
    text (tok.normalize). Terms truncated by the source ('...') and one-character terms (e.g. 'C', 'Ⅰ': they would
    tag noise) are skipped and counted."""
    terms = {}
    for type_id, path in enumerate(lexicon_files(folder), start=1):
        for line_no, line in enumerate(read_text(path).split('\n'), start=1):
            term = normalize(line).strip()
            if not term:
                continue
            if term.endswith('...') or len(term) < 2:
                if skipped is not None:
                    skipped.add(path, line_no, f'lexicon term {term!r} truncated or too short')
                continue
            terms.setdefault(term, type_id)
    return terms


class Tagger:
    def __init__(self, lexicon_dir, entity_types=False, normalize=normalize):
        """normalize: the tokenizer's (tok.normalize), so that terms are spelt as the text they are matched in."""
        self.entity_types = entity_types
        self.normalize = normalize
        self.terms = read_lexicon(lexicon_dir, normalize=normalize)  # term -> type id
        # every proper prefix of a term: the longest-match scan stops as soon as it leaves this set
        self.prefixes = {term[:k] for term in self.terms for k in range(1, len(term))}
        jieba.setLogLevel(logging.WARNING)
        words = jieba.Tokenizer()  # a private jieba, so the user words never leak into the global one
        words.initialize()
        for term in self.terms:
            if term not in words.FREQ:
                words.add_word(term, tag='n')
        self.pos = jieba.posseg.POSTokenizer(words)

    def encode(self, tok, text, extra_entities=(), entity_chars=None):
        """ids, lexical, entity: (N,) int64 arrays for `text` (normalised by the tokenizer first).
        entity_chars: the data set's own entity ids per character of text (already normalised), which
        replace lexicon matching for this text."""
        text, ids, begins = tok.encode_offsets(text)
        special = np.isin(ids, tok.special_ids)
        lexical = np.where(special, 0, self.lexical_per_char(text)[begins])
        if entity_chars is not None and len(entity_chars) != len(text):
            raise ValueError(
                f"entity ids for {len(entity_chars)} characters, but the normalised text has {len(text)}: "
                f"the reader must normalise the text it annotates ({text[:40]!r}...)"
            )
        per_char = self.entity_per_char(text, extra_entities) if entity_chars is None else np.asarray(entity_chars)
        entity = np.where(special, 0, per_char[begins])
        if tok.bos_id is not None:  # a document starts with the piece the model was trained to start from
            ids, lexical, entity = (
                np.concatenate([[first], x]) for first, x in ((tok.bos_id, ids), (0, lexical), (0, entity))
            )
        return ids, lexical.astype(np.int64), entity.astype(np.int64)

    def lexical_per_char(self, text):
        words = self.pos.lcut(text)
        classes = np.array([_LEXICAL_OF_LETTER.get(w.flag[:1], 0) for w in words], dtype=np.uint8)
        lexical = np.repeat(classes, [len(w.word) for w in words])
        assert len(lexical) == len(text), 'jieba lost characters'
        return lexical

    def lexicon_matches(self, text):
        """(start, term) of each lexicon term in text, by forward maximum matching."""
        i = 0
        while i < len(text):
            length = self._longest_term(text, i)
            if length:
                yield i, text[i : i + length]
            i += max(length, 1)

    def entity_per_char(self, text, extra_entities=()):
        entity = np.zeros(len(text), dtype=np.uint8)
        for start, term in self.lexicon_matches(text):
            entity[start : start + len(term)] = self.terms[term] if self.entity_types else 1
        for term in filter(None, map(self.normalize, extra_entities)):
            start = text.find(term)
            while start >= 0:
                entity[start : start + len(term)] = SYMPTOM if self.entity_types else 1
                start = text.find(term, start + len(term))
        return entity

    def _longest_term(self, text, i):
        longest, j = 0, i + 1
        while j <= len(text):
            piece = text[i:j]
            if piece in self.terms:
                longest = j - i
            if piece not in self.prefixes:
                break
            j += 1
        return longest


@functools.lru_cache(maxsize=2)
def _tools(tokenizer_path, lexicon_dir, entity_types):
    tok = Tokenizer.load(tokenizer_path)
    return tok, Tagger(lexicon_dir, entity_types, tok.normalize)


_worker_args = None


def init_worker(tokenizer_path, lexicon_dir, entity_types):
    """A tagging process's initializer: loads its tokenizer and tagger once (jieba's start-up takes a few
    seconds), for every tag_job it then runs."""
    global _worker_args
    _worker_args = (tokenizer_path, lexicon_dir, entity_types)
    _tools(*_worker_args)


def tag_job(job):
    """(ids, lexical, entity) of job = (text, extra entity terms, entity ids per character or None), with the
    tools init_worker loaded in this process."""
    tok, tagger = _tools(*_worker_args)
    return tagger.encode(tok, *job)


def tag_texts(jobs, tokenizer_path, lexicon_dir, entity_types=False, workers=2):
    """[(ids, lexical, entity)] for jobs [(text, extra_entities, entity_chars or None)], in input order, on
    `workers` processes."""
    args = (tokenizer_path, lexicon_dir, entity_types)
    if workers <= 1:
        init_worker(*args)
        return _collect(map(tag_job, jobs), jobs)
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=args) as pool:
        # imap yields in input order whatever order the workers finish in
        return _collect(pool.imap(tag_job, jobs, chunksize=4), jobs)


def _collect(results, jobs):
    out = []
    with tqdm(total=sum(len(job[0]) for job in jobs), unit='char', unit_scale=True, desc='tag', mininterval=1) as bar:
        for result, job in zip(results, jobs):
            out.append(result)
            bar.update(len(job[0]))
    return out
