"""Readers of the shared sources into plain records: the pretraining set (pretrain.py) and each example set
(covid.py, dxy.py, department.py, imcs.py) read them here. A record is a dict whose 'turns' are
[(speaker, text)], speaker 'patient' or 'doctor', text cleaned; a malformed record is counted in `skipped` with
its file and line, bad input that stops a build raises DataError naming the file.
"""

import ast
import csv
import io
import json
import re

from prepare.corpus import SPEAKERS, meddialog_blocks, meddialog_turns, record_turns, tagged_dialogue
from prepare.dataset import stratified_split
from prepare.sources import DataError, read_text, source_file
from prepare.text import clean, dialogue_text
from tagging import SYMPTOM

SPLIT_SEED = 1337  # every seeded split below


# ----------------------------------------------------------------------------- COVID-DDC (covid_dialog_zh/)

COVID_RAW = 'covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt'
COVID_SPLIT_FILES = {
    'train': 'covid_dialog_zh/train_data.json',
    'val': 'covid_dialog_zh/validate_data.json',
    'test': 'covid_dialog_zh/test_data.json',
}


def read_covid_raw(path, skipped):
    """Consultations of the raw dump: [dict(line, turns=[(speaker, text)], description, dialogue)], the last two
    being the letters of the description and of the dialogue alone (to match the split files against)."""
    consultations = []
    for line_no, block in meddialog_blocks(enumerate(read_text(path).split('\n'), start=1)):
        turns = meddialog_turns(block)
        if not re.fullmatch(r'id=\d+', block[0].strip()):
            skipped.add(path, line_no, 'consultation does not start with "id=N"')
        elif not turns:
            skipped.add(path, line_no, 'consultation without any text')
        else:
            consultations.append(
                {
                    'line': line_no,
                    'turns': [(speaker, text) for speaker, text, _ in turns],
                    'description': _content(text for _, text, section in turns if section == 'Description'),
                    'dialogue': _content(text for _, text, section in turns if section == 'Dialogue'),
                }
            )
    return consultations


def _content(texts):
    """Letters, digits and CJK only: the split files merge and re-punctuate the raw utterances."""
    return re.sub(r'\W', '', ''.join(texts))


def read_covid_split(path, skipped):
    """Dialogues of an official split file: [[(speaker, text)]]; utterances are prefixed '病人：' / '医生：'."""
    try:
        dialogues = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
    out = []
    for n, dialogue in enumerate(dialogues, start=1):
        turns = _covid_split_turns(dialogue)
        if turns is None:
            skipped.add(path, f'record {n}', 'not a list of "病人：…" / "医生：…" utterances')
        else:
            out.append(turns)
    return out


def _covid_split_turns(dialogue):
    if not isinstance(dialogue, list) or not dialogue:
        return None
    turns = []
    for utterance in dialogue:
        if not isinstance(utterance, str) or utterance[:2] not in SPEAKERS or utterance[2:3] not in '：:':
            return None
        if clean(utterance[3:]):
            turns.append((SPEAKERS[utterance[:2]], clean(utterance[3:])))
    return turns if any(speaker == 'doctor' for speaker, _ in turns) else None


def covid_pretraining_consultations(src, skipped):
    """Raw consultations minus exact duplicates and minus those holding a validation/test dialogue.
    Returns (dialogues [[(speaker, text)]], report dict, source paths)."""
    raw_path = source_file(COVID_RAW, src)
    held_out_paths = [source_file(COVID_SPLIT_FILES[split], src) for split in ('val', 'test')]
    # a split dialogue opens with the patient's description (a field of the raw description, sometimes cut or
    # re-worded), then the dialogue, merged and re-punctuated. A consultation is held out when it has the same
    # description (first 20 letters: a follow-up consultation repeats it), or the same dialogue and a
    # description starting alike (the dialogue alone is not enough: doctors' template replies recur).
    held_out = [
        (_content(turns[0][1]), _content(text for _, text in turns[1:]))
        for p in held_out_paths
        for turns in read_covid_split(p, skipped)
    ]
    kept, seen, duplicates, removed = [], set(), 0, 0
    for consultation in read_covid_raw(raw_path, skipped):
        text = dialogue_text(consultation['turns'])
        if text in seen:
            duplicates += 1
        elif any(_same_consultation(consultation, description, dialogue) for description, dialogue in held_out):
            removed += 1
        else:
            kept.append(consultation['turns'])
        seen.add(text)
    report = {'consultations_kept': len(kept), 'duplicates_removed': duplicates, 'val_test_removed': removed}
    print(
        f'COVID raw: kept {len(kept)} consultations, removed {duplicates} duplicates and {removed} '
        f'holding one of the {len(held_out)} validation/test dialogues'
    )
    return kept, report, [raw_path] + held_out_paths


def _same_consultation(consultation, description, dialogue):
    if len(description) >= 20 and description[:20] in consultation['description']:
        return True
    return description[:10] in consultation['description'] and dialogue in consultation['dialogue']


# ----------------------------------------------------------------------------- DXY (dxy_dialog/)

DXY_FILE = 'dxy_dialog/dxy_dialog_data_dialog_v2.txt'
DXY_VAL_FRACTION = 0.1


def read_dxy(path, skipped):
    """{'train': [record], 'test': [record]}, record = dict(turns, entities, disease). The file's two lines,
    `train [...]` and `test [...]`, are Python literals, parsed with ast.literal_eval (never eval)."""
    splits = {}
    for line_no, line in enumerate(read_text(path).split('\n'), start=1):
        if not line.strip():
            continue
        name, _, literal = line.partition(' ')
        if name not in ('train', 'test'):
            raise DataError(f'{path}:{line_no}: expected a line "train [...]" or "test [...]", got {line[:30]!r}')
        try:
            records = ast.literal_eval(literal)
        except (ValueError, SyntaxError) as e:
            raise DataError(f'{path}:{line_no}: the {name} list is not a Python literal ({e})') from e
        splits[name] = [r for r in (_dxy_record(path, line_no, n, x, skipped) for n, x in enumerate(records, 1)) if r]
    return splits


def _dxy_record(path, line_no, n, record, skipped):
    try:
        report, dialog, goal = clean(record['self_repo']), record['dialog'], record['goal']
        symptoms = list(goal.get('origin_inform_slots', [])) + [
            s for key in ('explicit_inform_slots', 'implicit_inform_slots') for s in goal.get(key, {})
        ]
        disease = record['disease_tag']
        # the dialog repeats the self report as its first utterance
        utterances = dialog[1:] if dialog and clean(dialog[0]) == report else dialog
        turns = [('patient', report)] + [
            ('doctor' if k % 2 == 0 else 'patient', clean(u)) for k, u in enumerate(utterances)
        ]
    except (KeyError, TypeError, AttributeError) as e:
        skipped.add(path, f'{line_no} record {n}', f'malformed DXY record ({type(e).__name__}: {e})')
        return None
    return {'turns': [(speaker, text) for speaker, text in turns if text], 'entities': symptoms, 'disease': disease}


def dxy_splits(src, skipped):
    """(train, val, test) record lists, and the source path."""
    path = source_file(DXY_FILE, src)
    official = read_dxy(path, skipped)
    train = official.get('train', [])
    parts = stratified_split([r['disease'] for r in train], {'val': DXY_VAL_FRACTION}, SPLIT_SEED)
    return [train[i] for i in parts['train']], [train[i] for i in parts['val']], official.get('test', []), path


# ----------------------------------------------------------------------------- department QA (department_qa/)

DEPARTMENT_FILE = 'department_qa/im_sample_gb18030.csv'
DEPARTMENT_ENCODING = 'gb18030'
DEPARTMENT_COLUMNS = ['department', 'title', 'ask', 'answer']
DEPARTMENT_FRACTIONS = {'val': 0.1, 'test': 0.1}


def read_department(path, skipped):
    """[dict(line, department, turns)] for the rows with four non-empty fields; the others are skipped."""
    reader = csv.reader(io.StringIO(read_text(path, DEPARTMENT_ENCODING), newline=''))
    header = next(reader)
    if header != DEPARTMENT_COLUMNS:
        raise DataError(f'{path}:1: expected the columns {",".join(DEPARTMENT_COLUMNS)}, got {",".join(header)[:80]}')
    rows = []
    for row in reader:
        fields = [clean(x) for x in row]
        if len(fields) != len(DEPARTMENT_COLUMNS) or not all(fields):
            skipped.add(path, reader.line_num, f'expected {len(DEPARTMENT_COLUMNS)} non-empty fields, got {row!r:.60}')
            continue
        department, title, ask, answer = fields
        rows.append(
            {
                'line': reader.line_num,
                'department': department,
                'turns': [('patient', f'{title}<sep>{ask}'), ('doctor', answer)],
            }
        )
    return rows


def department_splits(src, skipped):
    """{'train', 'val', 'test': [row]}, the department names, and the source path."""
    path = source_file(DEPARTMENT_FILE, src)
    # the file repeats some question-answer pairs word for word: split before removing them and a test
    # question would also be a training one. The first occurrence stays.
    rows, seen, read = [], set(), 0
    for row in read_department(path, skipped):
        read += 1
        text = row['turns'][0][1] + '<doctor>' + row['turns'][1][1]
        if text not in seen:
            seen.add(text)
            rows.append(row)
    print(
        f'department QA: {len(rows):,} distinct question-answer pairs of {read:,} rows '
        f'({read - len(rows)} repeats removed)'
    )
    parts = stratified_split([r['department'] for r in rows], DEPARTMENT_FRACTIONS, SPLIT_SEED)
    splits = {split: [rows[i] for i in idx] for split, idx in parts.items()}
    return splits, sorted({r['department'] for r in rows}), path


# ----------------------------------------------------------------------------- IMCS-21 (imcs21/)

IMCS_LABELLED, IMCS_UNLABELLED = 'imcs21/attr_dev.json', 'imcs21/test.json'
IMCS_FRACTIONS = {'val': 0.15, 'test': 0.15}


def read_imcs(path, skipped, gold=True, entity_types=False):
    """[dict(id, turns, entity_chars, diagnosis)] of one IMCS-21 file (an object of dialogues keyed by id)."""
    try:
        dialogues = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
    records = []
    for key, record in dialogues.items():
        shape, turns = record_turns(record)
        if shape != 'IMCS-21':
            skipped.add(path, f'dialogue {key}', 'not an IMCS-21 dialogue (no "dialogue" list)')
            continue
        if not gold:
            turns = [(speaker, text, None) for speaker, text, _ in turns]
        cleaned, entity_chars = tagged_dialogue(turns)
        if entity_chars is not None and entity_types:
            entity_chars = entity_chars * SYMPTOM  # IMCS-21 annotates symptoms
        records.append(dict(id=key, turns=cleaned, entity_chars=entity_chars, diagnosis=record.get('diagnosis')))
    return records


def imcs_splits(src, skipped, gold=True, entity_types=False):
    """{'train', 'val', 'test': [record]} and the disease names; val and test are labelled dialogues only."""
    paths = [source_file(IMCS_LABELLED, src), source_file(IMCS_UNLABELLED, src)]
    labelled = [r for r in read_imcs(paths[0], skipped, gold, entity_types) if r['diagnosis']]
    unlabelled = read_imcs(paths[1], skipped, gold, entity_types)
    diseases = sorted({r['diagnosis'] for r in labelled})
    parts = stratified_split([r['diagnosis'] for r in labelled], IMCS_FRACTIONS, SPLIT_SEED)
    splits = {
        split: [dict(labelled[i], label=diseases.index(labelled[i]['diagnosis'])) for i in idx]
        for split, idx in parts.items()
    }
    splits['train'] += [dict(r, label=-1) for r in unlabelled]
    return splits, diseases, paths


# ----------------------------------------------------------------------------- the medical book (medical_book/)

BOOK_FILE = 'medical_book/fever.txt'
_CHAPTER = re.compile(r'第.{1,3}章')  # 第一章, 第二章, 第—章 (sic)


def read_book(src=None):
    """(documents, source path): the cleaned text split at chapter headings."""
    path = source_file(BOOK_FILE, src)
    documents = [[]]
    for line in clean(read_text(path)).split('\n'):
        if _CHAPTER.match(line) and documents[-1]:
            documents.append([])
        documents[-1].append(line)
    return ['\n'.join(lines) for lines in documents], path
