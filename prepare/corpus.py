"""Any corpus a user points at (`python -m prepare.pretrain --corpus PATH ...`), read as Documents, streamed: a .txt,
.jsonl or .csv file is read line by line, never whole (a .json file is one JSON value, so it is parsed whole).

Recognised, by extension and shape:
  .txt    plain text, one document per blank-line-separated block (txt_document='line': per line, 'file': the
          whole file); or the MedDialog-CN raw dump (`id=N`, URL,
          `Description`, `Dialogue` with 病人：/医生： lines), recognised by its first line, as dialogues
  .jsonl  one record per line;  .json  a list of records, or an object of records keyed by id (IMCS-21)
          records: {"text"} | ShareGPT {"conversations": [{"from", "value"}]} | {"instruction", "input", "output"}
          | {"questions", "answers"} | ["病人：…", "医生：…"] | CHIP-MDCFNPC {"dialog_info": [{"sender", "text",
          "ner": [{"range": [start, end)}]}]} | IMCS-21 {"dialogue": [{"speaker", "sentence", "BIO_label"}]}
  .csv    question-answer tables with `ask` and `answer` columns (and optional `title`, `department`)
Every file is UTF-8 (with or without BOM), UTF-16 with a BOM, or GB18030, detected (file_encoding); a file that is
none of them with confidence is refused, and --encoding names its encoding.
Dialogues become '<patient>…<doctor>…' text; a QA pair is a one-turn dialogue. The data set's own entity
annotations (CHIP `ner` ranges, IMCS `BIO_label`) become per-character entity ids that replace lexicon
matching. A malformed record (one of a shape above with a field missing or of the wrong type) is skipped and
counted with file:line; a record of an unknown shape stops the build with the file, the line and the shapes above.
"""

import codecs
import csv
import json
import os
from typing import NamedTuple, Optional

import numpy as np

from prepare.sources import DataError
from prepare.text import clean, dialogue_text, normalize_as_read

EXTENSIONS = ('.txt', '.jsonl', '.json', '.csv')
SHAPES = (
    '{"text"}',
    'ShareGPT {"conversations"}',
    '{"instruction", "output"}',
    '{"questions", "answers"}',
    '["病人：…", "医生：…"]',
    'CHIP-MDCFNPC {"dialog_info"}',
    'IMCS-21 {"dialogue"}',
)
SPEAKERS = {'病人': 'patient', '患者': 'patient', '医生': 'doctor'}
SHAREGPT_SPEAKERS = {'human': 'patient', 'user': 'patient', 'gpt': 'doctor', 'assistant': 'doctor'}
# MedDialog-CN sections: the description is the patient's opening turn, the diagnosis a closing doctor turn
SECTION_SPEAKER = {
    'Description': 'patient',
    'Dialogue': None,
    'Diagnosis and suggestions': 'doctor',
    'Doctor faculty': None,
}


class Document(NamedTuple):
    text: str  # cleaned; dialogues as '<patient>…<doctor>…'
    entity_terms: tuple = ()  # extra entity strings, marked wherever they occur
    entity_chars: Optional[np.ndarray] = None  # the data set's own entity id per character of text
    source: str = ''
    line: int = 0
    fields: Optional[dict] = None  # the record's own fields (a JSON object, a CSV row), e.g. for a label


def corpus_files(paths):
    """Every file under the paths (folders recursively, in sorted order), each of a recognised kind."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f'{path}: no such file or folder')
    for path in files:
        if not os.path.isfile(path):  # os.walk lists a dangling or self-looping symbolic link as a file
            raise DataError(f'{path}: a symbolic link to no file ({os.readlink(path)}): fix or remove it')
        if not path.endswith(EXTENSIONS):
            raise DataError(f'{path}: not a corpus file this project reads (recognised: {", ".join(EXTENSIONS)})')
    return files


def read_corpus_file(path, skipped, report, txt_document='block', encoding=''):
    """The documents of one file; report gets its shape, encoding, records and documents.
    encoding: the user's --encoding, '' = detect (file_encoding)."""
    report.update(records=0, documents=0, encoding=file_encoding(path, encoding))
    if path.endswith('.txt'):
        documents = _txt(path, skipped, report, txt_document)
    else:
        documents = {'.jsonl': _jsonl, '.json': _json, '.csv': _csv}[os.path.splitext(path)[1]](path, skipped, report)
    for line, document in documents:
        report['documents'] += 1
        yield document._replace(source=path, line=line)
    if report['records'] == 0:
        raise DataError(f'{path}: file is empty (no record in it)')


# ----------------------------------------------------------------------------- text files

HEAD = 1 << 16  # bytes an encoding is detected from
RARE_SHARE = 0.05  # GB18030 only if at most this share of the non-ASCII characters are outside GB2312


def file_encoding(path, given=''):
    """The encoding to read a file with: `given` (--encoding), else detected from its first 64 KiB: UTF-16 by its
    byte-order mark, UTF-8 (with or without BOM), else GB18030 when it reads as Chinese, nearly every non-ASCII
    character one of GB2312's common ones. Bytes of another encoding (Latin-1...) often decode as GB18030 too,
    into rare characters: those are refused, naming --encoding, never read as mojibake."""
    if given:
        try:
            return codecs.lookup(given).name
        except LookupError:
            raise DataError(
                f'--encoding={given}: not an encoding Python knows (e.g. utf-8, gb18030, latin-1)'
            ) from None
    with open(path, 'rb') as f:
        head = f.read(HEAD)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return 'utf-16'
    if b'\x00' in head:
        raise DataError(
            f'{path}: byte {head.index(0)} is NUL: a binary file, or UTF-16/32 text without a byte-order '
            f'mark; convert it to UTF-8, or give its encoding with --encoding'
        )
    if _decode_head(head, 'utf-8-sig') is not None:
        return 'utf-8-sig'
    not_utf8 = f'byte {_first_error(head, "utf-8")} is not UTF-8'
    text = _decode_head(head, 'gb18030')
    if text is None:
        raise DataError(
            f'{path}: {not_utf8}, and the file is not GB18030 either: convert it to UTF-8, or give its '
            f'encoding with --encoding (e.g. --encoding=latin-1)'
        )
    non_ascii = [ch for ch in text if ch > '\x7f']
    rare = sum(not _in_gb2312(ch) for ch in non_ascii)
    if rare > RARE_SHARE * len(non_ascii):
        raise DataError(
            f'{path}: {not_utf8}, and read as GB18030 {rare} of its first {len(non_ascii)} non-ASCII '
            f'characters are rare ones (another encoding?): give its encoding with --encoding '
            f'(e.g. --encoding=latin-1), or convert it to UTF-8'
        )
    return 'gb18030'


def _decode_head(head, encoding):
    """head decoded, or None if it is not `encoding`. A character cut at its end is allowed: the head ends
    inside one, or the file does (then reading it names the line)."""
    try:
        return head.decode(encoding)
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:
            return _decode_head(head[: e.start], encoding)
        return None


def _first_error(data, encoding):
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        return e.start


def _in_gb2312(ch):
    try:
        ch.encode('gb2312')
        return True
    except UnicodeEncodeError:
        return False


def _lines(path, encoding):
    """(line number, line) of a text file, read lazily; a decoding error names the line."""
    with open(path, encoding=encoding) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line.rstrip('\n')
        except UnicodeDecodeError as e:
            raise DataError(
                f'{path}:{line_no + 1}: not valid {encoding} ({e.reason}): a damaged file, or give its '
                f'encoding with --encoding'
            ) from e


def _txt(path, skipped, report, unit):
    lines = _lines(path, report['encoding'])
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        return
    lines = _chain([first], lines)
    if first[1].startswith('id='):
        report['shape'] = 'MedDialog-CN raw dump'
        for line_no, block in meddialog_blocks(lines):
            report['records'] += 1
            turns = [(speaker, text) for speaker, text, _ in meddialog_turns(block)]
            if not turns:
                skipped.add(path, line_no, 'consultation without any text')
                continue
            yield line_no, Document(dialogue_text(turns))
        return
    report['shape'] = f'plain text, one document per {unit}'
    block, start = [], None
    for line_no, line in _chain(lines, [(None, '')]):
        if line.strip() and unit == 'line':
            report['records'] += 1
            yield line_no, Document(clean(line))
        elif line.strip() or (unit == 'file' and line_no is not None):
            block.append(line)
            start = start or line_no
        elif block:
            report['records'] += 1
            yield start, Document(clean('\n'.join(block)))
            block, start = [], None


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def meddialog_blocks(lines):
    """(first line number, lines) of each consultation of a MedDialog-CN dump: a block starts at an 'id=' line."""
    block, start = [], 1
    for line_no, line in _chain(lines, [(None, 'id=')]):  # a last 'id=' ends the last block
        if line.startswith('id='):
            if any(text.strip() for text in block):
                yield start, block
            block, start = [], line_no
        block.append(line)


def meddialog_turns(block):
    """[(speaker, text, section)] of one consultation, in file order."""
    turns, section = [], None  # turns: [speaker, [lines], section]
    for line in (line.strip() for line in block[1:]):
        if line in SECTION_SPEAKER:
            section = line
            if SECTION_SPEAKER[section]:
                turns.append([SECTION_SPEAKER[section], [], section])
        elif section == 'Dialogue' and line[:-1] in SPEAKERS and line[-1:] in '：:':
            turns.append([SPEAKERS[line[:-1]], [], section])
        elif line and section not in (None, 'Doctor faculty'):
            if not turns:  # dialogue text before any speaker line: consultations open with the patient
                turns.append(['patient', [], section])
            turns[-1][1].append(line)
    turns = [(speaker, clean('\n'.join(lines)), section) for speaker, lines, section in turns]
    return [turn for turn in turns if turn[1]]


# ----------------------------------------------------------------------------- JSON records


def _jsonl(path, skipped, report):
    for line_no, line in _lines(path, report['encoding']):
        if not line.strip():
            continue
        report['records'] += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.add(path, line_no, f'not valid JSON ({e.msg})')
            continue
        document = record_document(record, path, line_no, report, skipped)
        if document is not None:
            yield line_no, document


def _json(path, skipped, report):
    with open(path, encoding=report['encoding']) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
        except UnicodeDecodeError as e:
            raise DataError(
                f'{path}: not valid {report["encoding"]} ({e.reason}): a damaged file, or give its '
                f'encoding with --encoding'
            ) from e
    records = (
        value.values()
        if isinstance(value, dict) and 'text' not in value
        else value
        if isinstance(value, list)
        else [value]
    )
    for n, record in enumerate(records, start=1):
        report['records'] += 1
        document = record_document(record, path, f'record {n}', report, skipped)
        if document is not None:
            yield n, document


def record_document(record, path, where, report, skipped):
    """A Document from one JSON record of a recognised shape (None for a record skipped and counted in
    `skipped`); a clear error for any other shape."""
    try:
        shape, turns = record_turns(record)
        if shape is None:
            preview = json.dumps(record, ensure_ascii=False)[:80]
            raise DataError(
                f'{path}:{where}: a record of an unknown shape ({preview}); recognised: {"; ".join(SHAPES)}'
            )
        if shape == 'text':
            report['shape'] = shape
            return Document(clean(record['text']))
        cleaned, entity_chars = tagged_dialogue(turns) if turns else ([], None)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # e.g. a ShareGPT turn without "value"
        skipped.add(path, where, f'a record with a field missing or of the wrong type ({type(e).__name__}: {e})')
        return None
    report['shape'] = shape
    if shape in ('instruction', 'questions and answers') and {s for s, _ in cleaned} != {'patient', 'doctor'}:
        skipped.add(path, where, 'a record without a question or an answer')
        return None
    if not cleaned:
        return None
    return Document(
        dialogue_text(cleaned), entity_chars=entity_chars, fields=record if isinstance(record, dict) else None
    )


def tagged_dialogue(turns):
    """([(speaker, cleaned text)], entity ids per character of their dialogue_text, or None) from turns
    [(speaker, text, gold entity ids per character or None)]."""
    cleaned = [(speaker, *_tagged(text, gold)) for speaker, text, gold in turns]
    cleaned = [(speaker, text, tags) for speaker, text, tags in cleaned if text]
    text = dialogue_text([(speaker, text) for speaker, text, _ in cleaned])
    if all(gold is None for _, _, gold in turns) or normalize_as_read(text) != text:
        return [(speaker, text) for speaker, text, _ in cleaned], None  # (the second: never seen in the shared data)
    tags = [part for speaker, _, tags in cleaned for part in (np.zeros(len(speaker) + 2, dtype=np.uint8), tags)]
    return [(speaker, text) for speaker, text, _ in cleaned], np.concatenate(tags)


def _tagged(text, gold):
    """(cleaned text, its tags); with gold tags, normalised character by character so that each keeps its tag."""
    if gold is None:
        cleaned = clean(text)
        return cleaned, np.zeros(len(cleaned), dtype=np.uint8)
    chars, tags = [], []
    for char, tag in zip(text, gold):
        for piece in normalize_as_read(char if not char.isspace() else ' '):
            if piece == ' ' and (not chars or chars[-1] == ' '):
                continue  # one space for a run, none at the start, as normalize and clean do
            chars.append(piece)
            tags.append(tag)
    while chars and chars[-1] == ' ':
        chars.pop()
        tags.pop()
    return ''.join(chars), np.array(tags, dtype=np.uint8)


def record_turns(record):
    """(shape name, [(speaker, text, gold entity ids per character or None)]) or (None, None)."""
    if isinstance(record, list) and record and all(isinstance(u, str) and u[:2] in SPEAKERS for u in record):
        return 'utterances prefixed 病人：/医生：', [(SPEAKERS[u[:2]], u[2:].lstrip('：:'), None) for u in record]
    if not isinstance(record, dict):
        return None, None
    if isinstance(record.get('text'), str):
        return 'text', None
    if isinstance(record.get('conversations'), list):
        return 'ShareGPT', [
            (SHAREGPT_SPEAKERS[t['from']], t['value'], None)
            for t in record['conversations']
            if t.get('from') in SHAREGPT_SPEAKERS
        ]
    if 'instruction' in record and 'output' in record:
        ask = '\n'.join(filter(None, [record['instruction'], record.get('input') or '']))
        return 'instruction', [('patient', ask, None), ('doctor', record['output'], None)]
    if 'questions' in record and 'answers' in record:
        questions, answers = ([x] if isinstance(x, str) else x for x in (record['questions'], record['answers']))
        return 'questions and answers', [
            turn for q, a in zip(questions, answers) for turn in (('patient', q, None), ('doctor', a, None))
        ]
    if isinstance(record.get('dialog_info'), list):  # CHIP-MDCFNPC: ner mentions by [start, end) in the text
        turns = []
        for u in record['dialog_info']:
            gold = np.zeros(len(u['text']), dtype=np.uint8)
            for entity in u.get('ner', []):
                gold[entity['range'][0] : entity['range'][1]] = 1
            turns.append((SPEAKERS.get(u['sender'], 'patient'), u['text'], gold))
        return 'CHIP-MDCFNPC', turns
    if isinstance(record.get('dialogue'), list):  # IMCS-21: one B-/I-/O tag per character, where labelled
        turns = [('patient', record['self_report'], None)] if record.get('self_report') else []
        for u in record['dialogue']:
            labels = u.get('BIO_label', '').split()
            gold = (
                np.array([label[0] in 'BI' for label in labels], dtype=np.uint8)
                if len(labels) == len(u['sentence'])
                else None
            )
            turns.append((SPEAKERS.get(u['speaker'], 'patient'), u['sentence'], gold))
        return 'IMCS-21', turns
    return None, None


# ----------------------------------------------------------------------------- CSV


def _csv(path, skipped, report):
    with open(path, encoding=report['encoding'], newline='') as f:  # csv reads quoted newlines itself
        reader = csv.DictReader(f)
        try:
            missing = {'ask', 'answer'} - set(reader.fieldnames or ())
            if missing:
                raise DataError(
                    f'{path}:1: a question-answer table needs the columns ask and answer (title and '
                    f'department optional), got {reader.fieldnames}'
                )
            report['shape'] = 'question-answer table'
            for row in reader:
                report['records'] += 1
                title, ask, answer = (clean(row.get(key) or '') for key in ('title', 'ask', 'answer'))
                if not (ask or title) or not answer:
                    skipped.add(path, reader.line_num, 'a row without a question or an answer')
                    continue
                question = f'{title}<sep>{ask}' if title and ask else title or ask
                yield reader.line_num, Document(f'<patient>{question}<doctor>{answer}', fields=row)
        except UnicodeDecodeError as e:
            raise DataError(
                f'{path}:{reader.line_num + 1}: not valid {report["encoding"]} ({e.reason}): a damaged '
                f'file, or give its encoding with --encoding'
            ) from e
