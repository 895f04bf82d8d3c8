"""Tokenizers behind one interface: SentencePiece BPE (the default, an in-domain vocabulary) or one piece per
character (the GPT2-Chinese-style comparison point).

Both share one id layout: 0 <unk> (never produced: byte fallback covers every character), 1-4 the special
pieces, 5-260 the 256 byte pieces, then the learned pieces. Text is normalised here (see normalize) and
SentencePiece is trained with identity normalisation, so decode(encode(text)) == normalize(text) exactly and
the character offsets of the tokens index the same string that jieba segments.
"""
import io
import json
import re
import unicodedata
from collections import Counter

import numpy as np
import sentencepiece as spm

from prepare.sources import atomic_write

SPECIALS = ['<patient>', '<doctor>', '<sep>', '<eot>']
MAX_VOCAB = 65536  # ids are stored as uint16
MIN_VOCAB = 1 + len(SPECIALS) + 256 + 1  # layout above plus at least one learned piece
BYTE_PIECES = [f'<0x{b:02X}>' for b in range(256)]
_BYTE_OF = {p: b for b, p in enumerate(BYTE_PIECES)}
_SPECIAL_SPLIT = re.compile('(' + '|'.join(map(re.escape, SPECIALS)) + ')')
_SPACES = re.compile(r'[^\S\n]+')  # whitespace runs other than newlines


def normalize(text):
    """NFKC (full-width letters, digits, punctuation and spaces -> half-width), newline line ends, one space
    for any run of spaces. U+2581 becomes a space because SentencePiece uses it as its space symbol."""
    text = unicodedata.normalize('NFKC', text).replace('\r\n', '\n').replace('\r', '\n')
    return _SPACES.sub(' ', text.replace('\u2581', ' '))


def check_vocab_size(vocab_size):
    if vocab_size >= MAX_VOCAB:
        raise ValueError(f'vocab_size {vocab_size} is too large: token ids are stored as uint16, '
                         f'so the vocabulary must be smaller than {MAX_VOCAB}')
    if vocab_size < MIN_VOCAB:
        raise ValueError(f'vocab_size {vocab_size} is too small: specials and byte pieces alone take {MIN_VOCAB - 1}')


def train_bpe(lines, path, vocab_size=8000, char_coverage=0.9995):
    """SentencePiece BPE on an iterable of normalised text lines (no special pieces in them); saved at path."""
    check_vocab_size(vocab_size)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type='bpe', vocab_size=vocab_size,
        character_coverage=char_coverage, byte_fallback=True, user_defined_symbols=SPECIALS,
        normalization_rule_name='identity', add_dummy_prefix=False, remove_extra_whitespaces=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    atomic_write(path, model.getvalue())
    return Tokenizer.load(path)


def train_char(lines, path, vocab_size=8000):
    """One piece per character, the most frequent vocab_size - 261 characters; the rest fall back to bytes."""
    check_vocab_size(vocab_size)
    counts = Counter()
    for line in lines:
        counts.update(line)
    by_frequency = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties by character: deterministic
    chars = [ch for ch, _ in by_frequency[:vocab_size - MIN_VOCAB + 1]]
    pieces = ['<unk>'] + SPECIALS + BYTE_PIECES + chars
    atomic_write(path, json.dumps({'kind': 'char', 'pieces': pieces}, ensure_ascii=False).encode())
    return Tokenizer.load(path)


class Tokenizer:

    def __init__(self, kind, pieces, sp=None):
        self.kind = kind  # 'bpe' or 'char'
        self.pieces = pieces  # id -> piece
        self.sp = sp
        self.vocab_size = len(pieces)
        self.patient_id, self.doctor_id, self.sep_id, self.eot_id = (pieces.index(s) for s in SPECIALS)
        self.special_ids = np.array([self.patient_id, self.doctor_id, self.sep_id, self.eot_id])
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
    def from_bytes(cls, data):  # STAND-IN for branch h12a's: on merging h12a, take its version
        if data.startswith(b'{'):
            return cls('char', json.loads(data)['pieces'])
        sp = spm.SentencePieceProcessor(model_proto=data)
        return cls('bpe', [sp.id_to_piece(i) for i in range(sp.get_piece_size())], sp)

    def encode(self, text):
        return self.encode_offsets(text)[1].tolist()

    def encode_offsets(self, text):
        """(normalised text, ids (N,) int64, begins (N,) int64): begins[i] is the index in the normalised text
        of the first character of token i (for the bytes of a byte-fallback character: that character)."""
        text = normalize(text)
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
