"""Medical lexicon (medical_lexicon/*.txt, one term per line): entity dictionary and jieba user words."""
import os

from prepare.sources import read_text, source_file
from prepare.text import normalize

# a term listed in two files takes the type of the earlier one (427 terms are both symptom and disease)
ENTITY_TYPES = ['symptom', 'disease', 'drug', 'check', 'department']


def lexicon_dir(src=None):
    """The folder holding all lexicon files (downloaded into data/raw/ if they are not in the source folder)."""
    folders = {os.path.dirname(source_file(f'medical_lexicon/{name}.txt', src)) for name in ENTITY_TYPES}
    if len(folders) > 1:
        raise FileNotFoundError(f'lexicon files are split across {sorted(folders)}: put them in one folder')
    return folders.pop()


def lexicon_files(folder):
    return [os.path.join(folder, f'{name}.txt') for name in ENTITY_TYPES]


def read_lexicon(folder, skipped=None):
    """{term: type id} with type ids 1..5 in ENTITY_TYPES order. Terms truncated by the source ('...') and
    one-character terms (e.g. 'C', 'Ⅰ': they would tag noise) are skipped and counted."""
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
