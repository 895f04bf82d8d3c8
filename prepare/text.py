"""Text helpers every reader and the tokenizer share; they import nothing from the project.

normalize: the one normalisation of the pipeline (the tokenizer, the lexicon and the readers apply the
same), so that character offsets agree everywhere. clean: one field of a raw record made into text.
dialogue_text: turns into the '<patient>…<doctor>…' form that the tokenizer's speaker pieces encode.
"""

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


def clean(text):
    """One field of a record: no HTML tags, normalised characters, no blank or padded lines."""
    text = normalize(_HTML_TAG.sub('', text))
    return '\n'.join(line.strip() for line in text.split('\n') if line.strip())


def dialogue_text(turns):
    """[(speaker, text)] -> '<patient>...<doctor>...' (speaker is 'patient' or 'doctor')."""
    return ''.join(f'<{speaker}>{text}' for speaker, text in turns)
