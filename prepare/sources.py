"""Locating, fetching and reading the raw source files; shared by every reader.

A source file is looked up in the source folder (--src, else $CMED_DATA), then in data/raw/; if it is in
neither it is downloaded from its public URL into data/raw/ ($CMED_DATA_URL replaces the public URLs with
one mirror base URL, which is also how the tests exercise the download path without a network).
"""

import hashlib
import os
import tempfile
import urllib.request

RAW_DIR = os.path.join('data', 'raw')
PUBLIC_URLS = {
    'covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt': 'https://raw.githubusercontent.com/UCSD-AI4H/COVID-Dialogue/master/COVID-Dialogue-Dataset-Chinese.txt',
    'covid_dialog_zh/train_data.json': 'https://raw.githubusercontent.com/UCSD-AI4H/COVID-Dialogue/master/train_data.json',
    'covid_dialog_zh/validate_data.json': 'https://raw.githubusercontent.com/UCSD-AI4H/COVID-Dialogue/master/validate_data.json',
    'covid_dialog_zh/test_data.json': 'https://raw.githubusercontent.com/UCSD-AI4H/COVID-Dialogue/master/test_data.json',
    'dxy_dialog/dxy_dialog_data_dialog_v2.txt': 'https://raw.githubusercontent.com/lemuria-wchen/imcs21/main/task/DDP/KRDS/dxy_dialog_data_dialog_v2.txt',
    # the mirror holds a GB18030 sample of this file; the public one is the full internal-medicine part
    'department_qa/im_sample_gb18030.csv': 'https://raw.githubusercontent.com/Toyhom/Chinese-medical-dialogue-data/master/Data_数据/IM_内科/内科5000-33000.csv',
    'medical_book/fever.txt': 'https://raw.githubusercontent.com/shibing624/MedicalGPT/main/data/pretrain/fever.txt',
    # IMCS-21 as one public repository's first commit published it (the full set comes with CBLUE)
    'imcs21/attr_dev.json': 'https://raw.githubusercontent.com/zhaoxiongjun/DSD/bb69b37/dataset/attr_dev.json',
    'imcs21/test.json': 'https://raw.githubusercontent.com/zhaoxiongjun/DSD/bb69b37/dataset/test.json',
}
for _name in ('disease', 'symptom', 'drug', 'check', 'department'):
    PUBLIC_URLS[f'medical_lexicon/{_name}.txt'] = (
        f'https://raw.githubusercontent.com/liuhuanyong/QASystemOnMedicalKG/master/dict/{_name}.txt'
    )


class DataError(Exception):
    """Bad input that stops a build: the message names the file (and line) so it can be fixed."""


def source_dir(src=None):
    return src or os.environ.get('CMED_DATA') or RAW_DIR


def source_file(rel, src=None, raw_dir=RAW_DIR):
    """Path of source file `rel` (e.g. 'medical_book/fever.txt'), downloading it into raw_dir if needed."""
    for folder in (source_dir(src), raw_dir):
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            return path
    base = os.environ.get('CMED_DATA_URL')
    url = f'{base.rstrip("/")}/{rel}' if base else PUBLIC_URLS[rel]
    path = os.path.join(raw_dir, rel)
    print(f'{rel} not found in {source_dir(src)}: downloading {url} -> {path}')
    download(url, path)
    return path


def download(url, path):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise DataError(f'could not download {url}: {e}') from e
    atomic_write(path, data)


def atomic_write(path, data):
    """Write bytes to a temporary name in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_text(path, encoding='utf-8'):
    """The whole file as str; a clear DataError for an empty file or bytes that are not `encoding`."""
    with open(path, 'rb') as f:
        data = f.read()
    if not data.strip():
        raise DataError(f'{path}: file is empty')
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b'\n', 0, e.start) + 1
        others = [enc for enc in ('utf-8', 'gb18030') if enc != encoding and _decodes(data, enc)]
        hint = f'; it decodes as {others[0]}' if others else ''
        raise DataError(f'{path}:{line}: not valid {encoding} (byte 0x{data[e.start]:02x}){hint}') from e


def _decodes(data, encoding):
    try:
        data.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()  # streams: a corpus file may be larger than memory


class Skipped:
    """Malformed records: skipped, but counted and reported with file and line, never dropped silently."""

    def __init__(self):
        self.where = []  # ['file:line: why']

    def add(self, path, line, why):
        self.where.append(f'{path}:{line}: {why}')

    def __len__(self):
        return len(self.where)

    def report(self, shown=10):
        print(f'skipped {len(self.where)} malformed records')
        for where in self.where[:shown]:
            print(f'  {where}')

    def to_json(self):
        return {'count': len(self.where), 'where': self.where}
