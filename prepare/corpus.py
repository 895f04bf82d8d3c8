"""Any corpus a user points at, read as Documents, streamed (a file is never held in memory whole).

Recognised: `.txt` plain text, one document per blank-line-separated block.
"""
import os
from typing import NamedTuple, Optional

import numpy as np

from prepare.sources import DataError
from prepare.text import clean

EXTENSIONS = ('.txt',)


class Document(NamedTuple):
    text: str                                # cleaned; dialogues as '<patient>…<doctor>…'
    entity_terms: tuple = ()                 # extra entity strings, marked wherever they occur
    entity_chars: Optional[np.ndarray] = None  # the data set's own entity id per character of text
    source: str = ''
    line: int = 0


def corpus_files(paths):
    """Every file under the paths (folders recursively, in sorted order)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f'{path}: no such file or folder')
    for path in files:
        if not path.endswith(EXTENSIONS):
            raise DataError(f'{path}: not a recognised corpus file (recognised: {", ".join(EXTENSIONS)})')
    return files


def read_corpus_file(path, skipped, report):
    """The documents of one file: blank-line-separated blocks of plain text, read line by line."""
    block, start, report['documents'] = [], 1, 0
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                block.append(line)
                continue
            if block:
                report['documents'] += 1
                yield Document(clean(''.join(block)), source=path, line=start)
            block, start = [], line_no + 1
    if block:
        report['documents'] += 1
        yield Document(clean(''.join(block)), source=path, line=start)
