"""Text helpers every reader and the tokenizer share; they import nothing from the project.

normalize: the normalisation of the project's own tokenizers (BPE and char); the tokenizer, the lexicon and the
readers apply the same, so that character offsets agree everywhere. line_ends: all that a BERT vocabulary's text
gets (BertTokenizer normalises for itself, without NFKC). clean: one field of a raw record made into text, with
the normalisation of the tokenizer the build encodes with (reading_for). dialogue_text: turns into the
'<patient>…<doctor>…' form that the tokenizer's speaker pieces encode.
"""

import contextlib
import re
import unicodedata

_SPACES = re.compile(r'[^\S\n]+')  # whitespace runs other than newlines
# tags such as <br>, <p class=...>, </div>; our own speaker pieces are added after cleaning
_HTML_TAG = re.compile(r'</?[a-zA-Z][^<>]*>')


def normalize(text):
    """NFKC (full-width letters, digits, punctuation and spaces -> half-width), newline line ends, one space
    for any run of spaces. U+2581 becomes a space because SentencePiece uses it as its space symbol."""
    text = unicodedata.normalize('NFKC', text).replace('\r\n', '\n').replace('\r', '\n')
    return _SPACES.sub(' ', text.replace('\u2581', ' '))


def line_ends(text):
    """Newline line ends, nothing else: a BERT vocabulary's normalisation (its tokenizer drops whitespace and
    keeps the full-width forms its model was trained on)."""
    return text.replace('\r\n', '\n').replace('\r', '\n')


_read_as = [normalize]  # the normalisation clean() applies: the build's tokenizer's (reading_for sets it)


@contextlib.contextmanager
def reading_for(tokenizer_normalize):
    """Within it, clean() and the readers normalise text with tokenizer_normalize (a tokenizer's normalize:
    normalize, or line_ends for a BERT vocabulary) instead of normalize."""
    saved = _read_as[0]
    _read_as[0] = tokenizer_normalize
    try:
        yield
    finally:
        _read_as[0] = saved


def normalize_as_read(text):
    """text normalised as clean() normalises it now (see reading_for)."""
    return _read_as[0](text)


def clean(text):
    """One field of a record: no HTML tags, normalised characters, no blank or padded lines."""
    text = normalize_as_read(_HTML_TAG.sub('', text))
    return '\n'.join(line.strip() for line in text.split('\n') if line.strip())


def dialogue_text(turns):
    """[(speaker, text)] -> '<patient>...<doctor>...' (speaker is 'patient' or 'doctor')."""
    return ''.join(f'<{speaker}>{text}' for speaker, text in turns)
