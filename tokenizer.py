"""Tokenizers behind one interface: SentencePiece BPE (the default, an in-domain vocabulary), one piece per
character (the GPT2-Chinese-style comparison point), or GPT2-Chinese's own BERT character vocabulary (BertVocab,
at the end of this file) for continued pretraining from an imported model.

Both share one id layout: 0 <unk> (never produced: byte fallback covers every character), 1-4 the special
pieces, 5-260 the 256 byte pieces, then the learned pieces. Text is normalised here (see normalize) and
SentencePiece is trained with identity normalisation, so decode(encode(text)) == normalize(text) exactly and
the character offsets of the tokens index the same string that jieba segments. Each kind has its own
normalisation (tok.normalize; normalization_for before a tokenizer exists), which prepare/ applies as it reads.
"""

import io
import json
import os
import re
import string
import unicodedata
from collections import Counter

import numpy as np
import sentencepiece as spm

from prepare.sources import DataError, atomic_write
from prepare.text import line_ends, normalize

SPECIALS = ['<patient>', '<doctor>', '<sep>', '<eot>']
MAX_VOCAB = 65536  # ids are stored as uint16
MIN_VOCAB = 1 + len(SPECIALS) + 256 + 1  # layout above plus at least one learned piece
BYTE_PIECES = [f'<0x{b:02X}>' for b in range(256)]
_BYTE_OF = {p: b for b, p in enumerate(BYTE_PIECES)}
_SPECIAL_SPLIT = re.compile('(' + '|'.join(map(re.escape, SPECIALS)) + ')')


def check_vocab_size(vocab_size):
    if vocab_size >= MAX_VOCAB:
        raise ValueError(
            f'vocab_size {vocab_size} is too large: token ids are stored as uint16, '
            f'so the vocabulary must be smaller than {MAX_VOCAB}'
        )
    if vocab_size < MIN_VOCAB:
        raise ValueError(f'vocab_size {vocab_size} is too small: specials and byte pieces alone take {MIN_VOCAB - 1}')


def train_bpe(lines, path, vocab_size=8000, char_coverage=0.9995):
    """SentencePiece BPE on an iterable of normalised text lines (no special pieces in them); saved at path."""
    check_vocab_size(vocab_size)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        character_coverage=char_coverage,
        byte_fallback=True,
        user_defined_symbols=SPECIALS,
        normalization_rule_name='identity',
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
    )
    atomic_write(path, model.getvalue())
    return Tokenizer.load(path)


def train_char(lines, path, vocab_size=8000):
    """One piece per character, the most frequent vocab_size - 261 characters; the rest fall back to bytes."""
    check_vocab_size(vocab_size)
    counts = Counter()
    for line in lines:
        counts.update(line)
    by_frequency = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties by character: deterministic
    chars = [ch for ch, _ in by_frequency[: vocab_size - MIN_VOCAB + 1]]
    pieces = ['<unk>'] + SPECIALS + BYTE_PIECES + chars
    atomic_write(path, json.dumps({'kind': 'char', 'pieces': pieces}, ensure_ascii=False).encode())
    return Tokenizer.load(path)


def normalization_for(spec):
    """The normalisation of the tokenizer a prepare/ build is given (--tokenizer, --tokenizer_model), so that text
    is read as it will be encoded: BertVocab's for a BERT vocabulary (a vocab.txt, or the tokenizer.model a build
    stored it as), else NFKC (normalize), from which 'bpe' and 'char' learn their pieces. A missing or broken file
    gets NFKC here: the build refuses it."""
    if spec in ('bpe', 'char') or not os.path.isfile(spec):
        return normalize
    with open(spec, 'rb') as f:
        data = f.read()
    if data.startswith(b'{'):  # a tokenizer.model this project wrote as JSON: char or BERT
        try:
            return Tokenizer.from_bytes(data).normalize
        except (ValueError, KeyError):
            return normalize
    try:
        bert_vocab_model(spec)
    except DataError:
        return normalize  # a SentencePiece model, or a file the build refuses
    return line_ends


class Tokenizer:
    normalize = staticmethod(normalize)  # NFKC and the rest: the text BPE and char pieces are learned from

    def __init__(self, kind, pieces, sp=None):
        self.kind = kind  # 'bpe' or 'char'
        self.pieces = pieces  # id -> piece
        self.sp = sp
        self.vocab_size = len(pieces)
        self.patient_id, self.doctor_id, self.sep_id, self.eot_id = (pieces.index(s) for s in SPECIALS)
        self.special_ids = np.array([self.patient_id, self.doctor_id, self.sep_id, self.eot_id])
        self.unk_id, self.bos_id = 0, None  # <unk> is never produced (byte fallback); documents need no start piece
        self._bytes = [_piece_bytes(p) for p in pieces]
        counts = self.char_counts()
        # characters each id spans in the normalised input text: like char_counts, but a special piece
        # spans its literal text ('<patient>' is 9 characters)
        self._span = np.where(np.isin(np.arange(len(pieces)), self.special_ids), [len(p) for p in pieces], counts)
        self._byte_base = pieces.index(BYTE_PIECES[0])
        self._char_id = {p: i for i, p in enumerate(pieces) if i >= MIN_VOCAB - 1} if kind == 'char' else None

    @classmethod
    def load(cls, path):
        with open(path, 'rb') as f:
            data = f.read()
        return cls.from_bytes(data)

    @classmethod
    def from_bytes(cls, data):
        if data.startswith(b'{'):
            stored = json.loads(data)
            return BertVocab(stored['pieces']) if stored['kind'] == 'bert' else cls('char', stored['pieces'])
        sp = spm.SentencePieceProcessor(model_proto=data)
        return cls('bpe', [sp.id_to_piece(i) for i in range(sp.get_piece_size())], sp)

    def encode(self, text):
        return self.encode_offsets(text)[1].tolist()

    def encode_offsets(self, text):
        """(normalised text, ids (N,) int64, begins (N,) int64): begins[i] is the index in the normalised text
        of the first character of token i (for the bytes of a byte-fallback character: that character)."""
        text = self.normalize(text)
        ids = np.array(self.sp.encode(text) if self.kind == 'bpe' else self._encode_chars(text), dtype=np.int64)
        spans = self._span[ids]
        begins = np.cumsum(spans) - spans
        begins[spans == 0] -= 1  # UTF-8 continuation bytes: back to the character their lead byte opened
        assert spans.sum() == len(text), 'token spans do not cover the text'
        return text, ids, begins

    def _encode_chars(self, text):
        ids = []
        for part in _SPECIAL_SPLIT.split(text):
            if part in SPECIALS:
                ids.append(self.pieces.index(part))
                continue
            for ch in part:
                i = self._char_id.get(ch)
                ids.extend([i] if i is not None else [self._byte_base + b for b in ch.encode()])
        return ids

    def decode(self, ids):
        return b''.join(self._bytes[i] for i in ids).decode('utf-8', errors='replace')

    def char_counts(self):
        """(vocab_size,) int64: characters each id adds to decoded text; 1 for a UTF-8 lead byte piece, 0 for a
        continuation byte, 0 for <unk> and the special pieces (they are markup, not text)."""
        return np.array([_piece_chars(i, p) for i, p in enumerate(self.pieces)], dtype=np.int64)


def _piece_bytes(piece):
    if piece in _BYTE_OF:
        return bytes([_BYTE_OF[piece]])
    return piece.replace('\u2581', ' ').encode()


def _piece_chars(i, piece):
    if i == 0 or piece in SPECIALS:
        return 0
    if piece in _BYTE_OF:
        return int(_BYTE_OF[piece] < 0x80 or _BYTE_OF[piece] >= 0xC0)
    return len(piece)


# ----------------------------------------------------------------------------- GPT2-Chinese's BERT vocabulary

# Our pieces -> reserved entries of the BERT vocabulary, so that an imported model needs no new embedding row.
BERT_SPECIALS = {'<patient>': '[unused1]', '<doctor>': '[unused2]', '<sep>': '[unused3]', '<eot>': '[SEP]'}
BERT_MAX_WORD = 100  # longer words become one [UNK], as in BertTokenizer
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)  # the blocks BERT gives one token per character


def import_bert_vocab(vocab_path, path):
    """Store a BERT vocab.txt (one piece per line, line number = id) as tokenizer.model; returns the tokenizer."""
    atomic_write(path, bert_vocab_model(vocab_path))
    return Tokenizer.load(path)


def bert_vocab_model(vocab_path):
    """The bytes of tokenizer.model for a BERT vocab.txt, refused (naming the file) unless it can be one."""
    if not os.path.isfile(vocab_path):
        raise DataError(f"no tokenizer {vocab_path!r}: give 'bpe', 'char' or the path of a BERT vocab.txt")
    with open(vocab_path, 'rb') as f:
        data = f.read()
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(
            f'{vocab_path} is not a BERT vocabulary: byte {e.start} is not UTF-8 text (a binary or '
            f'damaged file?); give the vocab.txt the model was trained with'
        ) from None
    pieces = [line.rstrip('\n') for line in io.StringIO(text, newline=None)]  # as open() reads it: \r\n is \n
    missing = [p for p in ['[UNK]', '[CLS]', *BERT_SPECIALS.values()] if p not in pieces]
    if missing or len(pieces) >= MAX_VOCAB:
        raise DataError(
            f'{vocab_path} is not a BERT vocabulary this project can use: '
            + (f'no {", ".join(missing)}' if missing else f'{len(pieces)} pieces, ids must fit uint16')
        )
    return json.dumps({'kind': 'bert', 'pieces': pieces}, ensure_ascii=False).encode()


class BertVocab:
    """BertTokenizer's tokenization with a BERT vocab.txt, behind the Tokenizer interface.

    As UER-py tokenized the corpus its GPT2-Chinese models were trained on (uer/utils/tokenizers.py: BertTokenizer
    with --do_lower_case "true", its default): control characters are dropped, whitespace separates words and is
    itself dropped, every CJK character is a word of its own, Latin letters are lower-cased with accents
    stripped, punctuation is a word of its own, and each word is cut into the longest pieces of the vocabulary
    (continuations spelt '##...'); a word with no such cut is one [UNK]. No NFKC: full-width punctuation (，：？)
    keeps its own pieces, as the models saw it. UER's data also framed each document as [CLS] ... [SEP]: <eot>
    is [SEP], and bos_id ([CLS]) is put in front of every document by tagging.py.

    For bits per character (char_counts) a piece counts its characters ('##' excluded), [UNK] counts 1 (it is
    nearly always one rare character or symbol) and the special pieces 0. The whitespace BERT drops is not
    counted, so on text with spaces the denominator is smaller and bits/char a little higher than for the
    tokenizers that keep every character: the comparison errs against this tokenizer, never for it.
    """

    kind = 'bert'
    normalize = staticmethod(line_ends)  # no NFKC: BertTokenizer (and UER) kept the full-width forms

    def __init__(self, pieces):
        self.pieces = pieces
        self.vocab_size = len(pieces)
        self._id = {p: i for i, p in enumerate(pieces)}
        self.patient_id, self.doctor_id, self.sep_id, self.eot_id = (self._id[BERT_SPECIALS[s]] for s in SPECIALS)
        self.unk_id, self.bos_id = self._id['[UNK]'], self._id['[CLS]']
        self.special_ids = np.array([self.patient_id, self.doctor_id, self.sep_id, self.eot_id, self.bos_id])
        self._text = {
            i: '' if p.startswith('[') and p.endswith(']') else p.removeprefix('##') for i, p in enumerate(pieces)
        }
        self._text.update({self._id[b]: s for s, b in BERT_SPECIALS.items()})
        self._text[self.unk_id] = '\ufffd'

    def encode(self, text):
        return self.encode_offsets(text)[1].tolist()

    def encode_offsets(self, text):
        """(normalised text, ids (N,) int64, begins (N,) int64): begins[i] is the index in the normalised text
        of the first character of token i. No [CLS] here: see bos_id."""
        text = self.normalize(text)
        ids, begins, start = [], [], 0
        for part in _SPECIAL_SPLIT.split(text):
            if part in BERT_SPECIALS:
                ids.append(self._id[BERT_SPECIALS[part]])
                begins.append(start)
            else:
                for word in _bert_words(part, start):
                    self._wordpiece(word, ids, begins)
            start += len(part)
        return text, np.array(ids, dtype=np.int64), np.array(begins, dtype=np.int64)

    def _wordpiece(self, word, ids, begins):
        """Greedy longest-match-first pieces of one word [(char, index in text)], appended to ids and begins."""
        chars = ''.join(c for c, _ in word)
        if len(chars) > BERT_MAX_WORD:
            ids.append(self.unk_id)
            begins.append(word[0][1])
            return
        found, start = [], 0
        while start < len(chars):
            for end in range(len(chars), start, -1):
                piece_id = self._id.get(chars[start:end] if start == 0 else '##' + chars[start:end])
                if piece_id is not None:
                    found.append((piece_id, word[start][1]))
                    start = end
                    break
            else:  # no piece fits here: the whole word is unknown
                found = [(self.unk_id, word[0][1])]
                break
        ids.extend(i for i, _ in found)
        begins.extend(b for _, b in found)

    def decode(self, ids):
        """Pieces joined; a space between two words that BERT could only have split at whitespace."""
        out = []
        for i in ids:
            piece, text = self.pieces[i], self._text[i]
            if out and text and not piece.startswith('##') and _wordy(out[-1][-1:]) and _wordy(text[:1]):
                out.append(' ')
            if text:
                out.append(text)
        return ''.join(out)

    def char_counts(self):
        """(vocab_size,) int64: characters each id stands for in the scored text (see the class docstring)."""
        counts = np.array([len(self._text[i]) for i in range(self.vocab_size)], dtype=np.int64)
        counts[self.special_ids] = 0
        return counts


def _bert_words(text, offset):
    """BERT's basic tokenization of text: words as lists of (char, index of its source character + offset)."""
    word = []
    for i, ch in enumerate(text, start=offset):
        if ch in '\x00\ufffd' or (ch not in '\t\n\r' and unicodedata.category(ch) in ('Cc', 'Cf')):
            continue  # dropped without ending the word, as BERT's _clean_text does
        if _is_space(ch):
            if word:
                yield word
            word = []
        elif any(lo <= ord(ch) <= hi for lo, hi in _CJK):
            if word:
                yield word
            yield [(ch, i)]
            word = []
        else:
            for c in _lower_unaccented(ch):
                if _is_punctuation(c):
                    if word:
                        yield word
                    yield [(c, i)]
                    word = []
                else:
                    word.append((c, i))
    if word:
        yield word


def _lower_unaccented(ch):
    return ''.join(c for c in unicodedata.normalize('NFD', ch.lower()) if unicodedata.category(c) != 'Mn')


def _is_space(ch):
    return ch in ' \t\n\r' or unicodedata.category(ch) == 'Zs'


def _is_punctuation(ch):
    """BERT's punctuation: the ASCII characters that are not letters, digits or spaces, and Unicode P*."""
    return ch in string.punctuation or unicodedata.category(ch).startswith('P')


def _wordy(text):
    """Does this (one-character) text belong to a word that only whitespace could have ended?"""
    return (
        bool(text)
        and not _is_punctuation(text)
        and not _is_space(text)
        and not any(lo <= ord(text) <= hi for lo, hi in _CJK)
    )
