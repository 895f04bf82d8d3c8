"""Medical book text (medical_book/fever.txt, a 传染病学 textbook): pretraining documents, one per chapter."""
import re

from prepare.sources import read_text, source_file
from prepare.text import clean

FILE = 'medical_book/fever.txt'
_CHAPTER = re.compile(r'第.{1,3}章')  # 第一章, 第二章, 第—章 (sic)


def read_book(src=None):
    """(documents, source path): the cleaned text split at chapter headings."""
    path = source_file(FILE, src)
    documents = [[]]
    for line in clean(read_text(path)).split('\n'):
        if _CHAPTER.match(line) and documents[-1]:
            documents.append([])
        documents[-1].append(line)
    return ['\n'.join(lines) for lines in documents], path
