"""Tests for prepare/: readers, tokenizer, tags, bins. Real data slices from ../shared/data (or $CMED_DATA)."""

import ast
import csv
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from prepare import readers
from prepare.dataset import atomic_dir, cut_examples, stratified_split, write_examples, write_tokens
from prepare.sources import DataError, Skipped, atomic_write, download, read_text, source_file
from prepare.text import dialogue_text, normalize
from tagging import Tagger, tag_texts
from tokenizer import Tokenizer, check_vocab_size, train_bpe, train_char

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('CMED_DATA', ROOT.parent / 'shared' / 'data')).resolve()
LEXICON = DATA / 'medical_lexicon'
SHARED_FILES = {  # every shared source file and its encoding
    'covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt': 'utf-8',
    'covid_dialog_zh/train_data.json': 'utf-8',
    'covid_dialog_zh/validate_data.json': 'utf-8',
    'covid_dialog_zh/test_data.json': 'utf-8',
    'dxy_dialog/dxy_dialog_data_dialog_v2.txt': 'utf-8',
    'department_qa/im_sample_gb18030.csv': 'gb18030',
    'medical_book/fever.txt': 'utf-8',
    **{f'medical_lexicon/{n}.txt': 'utf-8' for n in ('disease', 'symptom', 'drug', 'check', 'department')},
}


def shared_text(rel):
    return read_text(DATA / rel, SHARED_FILES[rel])


@pytest.fixture(scope='session')
def training_lines():
    book = shared_text('medical_book/fever.txt').split('\n')
    qa = shared_text('department_qa/im_sample_gb18030.csv').split('\n')[:1500]
    dialogue = shared_text('covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt').split('\n')[:4000]
    return [line for line in map(normalize, book + qa + dialogue) if line.strip()]


@pytest.fixture(scope='session')
def bpe_path(tmp_path_factory, training_lines):
    path = str(tmp_path_factory.mktemp('tok') / 'bpe.model')
    train_bpe(training_lines, path, 2000, char_coverage=0.99)
    return path


@pytest.fixture(scope='session')
def bpe(bpe_path):
    return Tokenizer.load(bpe_path)


@pytest.fixture(scope='session')
def char_tok(tmp_path_factory, training_lines):
    """1500 pieces: the shared data has rarer characters, which take byte pieces."""
    return train_char(training_lines, str(tmp_path_factory.mktemp('tok') / 'char.model'), 1500)


@pytest.fixture(scope='session')
def tagger():
    return Tagger(str(LEXICON))


# --- tags, checked by hand ---------------------------------------------------------------------------------

SENTENCE = '宝宝发烧三天，咳嗽有痰<doctor>建议做血常规检查。'
# per character of the normalised sentence ('，' -> ','); jieba: 宝宝/nr 发烧/v 三天/m ,/x 咳嗽/v 有/v 痰/n
# <doctor> 建议/n 做/v 血常规/n 检查/vn 。/x; lexicon: 发烧 and 咳嗽 are symptoms, 血常规 a check, 痰 is
# a one-character term (left out). 0 other, 1 noun, 2 verb, 3 adjective.
SENTENCE_LEXICAL = [1, 1, 2, 2, 0, 0, 0, 2, 2, 2, 1] + [0] * 8 + [1, 1, 2, 1, 1, 1, 2, 2, 0]
SENTENCE_ENTITY = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0] + [0] * 8 + [0, 0, 0, 1, 1, 1, 0, 0, 0]
SENTENCE_TYPES = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0] + [0] * 8 + [0, 0, 0, 4, 4, 4, 0, 0, 0]  # symptom 1, check 4


def test_hand_checked_tags_char_tokenizer(tmp_path, tagger):
    tok = train_char([normalize(SENTENCE).replace('<doctor>', '')], str(tmp_path / 'char.model'))
    ids, lexical, entity = tagger.encode(tok, SENTENCE)
    doctor = SENTENCE.index('<doctor>')
    keep = [i for i in range(len(SENTENCE_LEXICAL)) if not doctor < i < doctor + 8]  # one token for <doctor>
    assert tok.decode(ids) == normalize(SENTENCE) and len(ids) == len(keep)
    assert lexical.tolist() == [SENTENCE_LEXICAL[i] for i in keep]
    assert entity.tolist() == [SENTENCE_ENTITY[i] for i in keep]
    # the record's own annotation (e.g. a DXY symptom slot) marks 有痰 too
    _, _, entity = tagger.encode(tok, SENTENCE, extra_entities=['有痰'])
    assert entity.tolist()[9:11] == [1, 1] and entity.tolist()[:9] == [SENTENCE_ENTITY[i] for i in keep][:9]


def test_entity_types(tagger):
    typed = Tagger(str(LEXICON), entity_types=True)
    text = normalize(SENTENCE)
    assert typed.entity_per_char(text).tolist() == SENTENCE_TYPES
    assert tagger.entity_per_char(text).tolist() == SENTENCE_ENTITY


def sentencepiece_begins(tok, text):
    """Character offsets of the pieces, from SentencePiece's own serialized SentencePieceText proto
    (field 2 = pieces; in a piece, field 4 = begin byte offset)."""
    data, begins, i = tok.sp.encode(text, out_type='serialized_proto'), [], 0
    while i < len(data):
        field, wire, value, i = _proto_field(data, i)
        if field == 2:
            j = 0
            while j < len(value):
                f, _, v, j = _proto_field(value, j)
                begins += [len(text.encode()[:v].decode())] if f == 4 else []
    return begins


def _proto_field(data, i):
    key, i = _varint(data, i)
    if key & 7 == 0:
        value, i = _varint(data, i)
        return key >> 3, 0, value, i
    length, i = _varint(data, i)
    return key >> 3, 2, data[i : i + length], i + length


def _varint(data, i):
    value, shift = 0, 0
    while True:
        value |= (data[i] & 127) << shift
        shift += 7
        i += 1
        if data[i - 1] < 128:
            return value, i


def test_bpe_tags_follow_first_character(bpe, tagger):
    text = normalize(SENTENCE + '𠀀')  # a character outside the vocabulary: byte fallback
    ids, lexical, entity = tagger.encode(bpe, text)
    begins = sentencepiece_begins(bpe, text)
    _, own_ids, own_begins = bpe.encode_offsets(text)
    assert own_begins.tolist() == begins and own_ids.tolist() == ids.tolist()
    special = np.isin(ids, bpe.special_ids)
    assert lexical.tolist() == np.where(special, 0, np.array(SENTENCE_LEXICAL + [0])[begins]).tolist()
    assert entity.tolist() == np.where(special, 0, np.array(SENTENCE_ENTITY + [0])[begins]).tolist()


# --- tokenizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('rel', sorted(SHARED_FILES))
def test_no_unk_and_text_round_trip_on_shared_data(rel, bpe, char_tok):
    text = shared_text(rel)
    assert '<patient>' not in text and '<doctor>' not in text  # so every character is text, none is markup
    for tok in (bpe, char_tok):
        ids = tok.encode(text)
        assert 0 not in ids, f'<unk> in {rel}'
        assert tok.decode(ids) == normalize(text)
        assert tok.char_counts()[ids].sum() == len(normalize(text))


def test_vocab_of_65536_or_more_refused(tmp_path, training_lines):
    check_vocab_size(65535)
    for size in (65536, 100000):
        with pytest.raises(ValueError, match='uint16'):
            check_vocab_size(size)
        with pytest.raises(ValueError, match='uint16'):
            train_bpe(training_lines, str(tmp_path / 'x.model'), size)
    result = subprocess.run(
        [sys.executable, '-m', 'prepare.pretrain', '--vocab_size', '65536'], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0 and 'uint16' in result.stderr
    assert not (tmp_path / 'x.model').exists()


# --- bins ----------------------------------------------------------------------------------------------------


def test_bins_round_trip_and_parallel_order(bpe, bpe_path, tmp_path):
    consultations = readers.read_dxy(str(DATA / 'dxy_dialog/dxy_dialog_data_dialog_v2.txt'), Skipped())['test'][:12]
    jobs = [(dialogue_text(r['turns']), tuple(r['entities']), None) for r in consultations]
    serial = tag_texts(jobs, bpe_path, str(LEXICON), workers=1)
    parallel = tag_texts(jobs, bpe_path, str(LEXICON), workers=2)
    assert all((a == b).all() for s, p in zip(serial, parallel) for a, b in zip(s, p))
    # pretraining layout: documents each followed by <eot>
    ids = np.concatenate([np.append(t[0], bpe.eot_id) for t in serial])
    write_tokens(str(tmp_path), 'val', ids, ids * 0, ids * 0 + 1)
    read = np.memmap(tmp_path / 'val.bin', dtype=np.uint16, mode='r')
    assert len(np.fromfile(tmp_path / 'val.ent.bin', dtype=np.uint8)) == len(read)
    assert bpe.decode(read.tolist()) == ''.join(normalize(text) + '<eot>' for text, _, _ in jobs)
    # example layout: one example per doctor turn, the doctor's utterance as target
    examples = [ex for r, t in zip(consultations, serial) for ex in cut_examples(*t, bpe, label=3)]
    write_examples(str(tmp_path), 'test', examples)
    ids = np.fromfile(tmp_path / 'test.bin', dtype=np.uint16)
    mask = np.fromfile(tmp_path / 'test.mask.bin', dtype=np.uint8)
    offsets, labels = np.load(tmp_path / 'test.offsets.npy'), np.load(tmp_path / 'test.labels.npy')
    doctor_turns = [(r, k) for r in consultations for k, (speaker, _) in enumerate(r['turns']) if speaker == 'doctor']
    assert len(offsets) == len(doctor_turns) + 1 and offsets[-1] == len(ids) == len(mask)
    for n, (record, k) in enumerate(doctor_turns):
        start, end = offsets[n], offsets[n + 1]
        source, target = ids[start:end][mask[start:end] == 0], ids[start:end][mask[start:end] == 1]
        assert bpe.decode(source.tolist()) == dialogue_text(record['turns'][:k]) + '<doctor>'
        assert bpe.decode(target.tolist()) == record['turns'][k][1] + '<eot>'
        assert labels[n] == (3 if k == 1 else -1)


# --- bad input ---------------------------------------------------------------------------------------------


def qa_rows(count):
    return shared_text('department_qa/im_sample_gb18030.csv').split('\n')[: count + 1]


def test_gb18030_read_and_wrong_encoding_named(tmp_path):
    path = tmp_path / 'qa.csv'
    path.write_bytes('\n'.join(qa_rows(30)).encode('gb18030'))
    rows = readers.read_department(str(path), Skipped())
    assert len(rows) == 30 and rows[0]['department'] == '心血管科' and '<sep>' in rows[0]['turns'][0][1]
    path.write_bytes('\n'.join(qa_rows(30)).encode('utf-8'))
    with pytest.raises(DataError, match=rf'{path}:\d+: not valid gb18030.*decodes as utf-8'):
        readers.read_department(str(path), Skipped())
    path.write_bytes(b'ok\n' + '病人'.encode('gb18030'))
    with pytest.raises(DataError, match=rf'{path}:2: not valid utf-8'):
        read_text(str(path))


def test_malformed_records_skipped_and_counted_with_file_and_line(tmp_path):
    skipped = Skipped()
    rows = qa_rows(10)
    rows.insert(5, '心血管科,只有标题')  # line 6: two fields
    (tmp_path / 'qa.csv').write_bytes('\n'.join(rows).encode('gb18030'))
    assert len(readers.read_department(str(tmp_path / 'qa.csv'), skipped)) == 10
    assert skipped.where == [f'{tmp_path / "qa.csv"}:6: expected 4 non-empty fields, got [\'心血管科\', \'只有标题\']']
    (tmp_path / 'split.json').write_text(json.dumps([['病人：你好', '医生：你好'], ['你好'], ['病人：a', '医生：b']]))
    assert len(readers.read_covid_split(str(tmp_path / 'split.json'), skipped)) == 2
    line = shared_text('dxy_dialog/dxy_dialog_data_dialog_v2.txt').split('\n')[0]
    records = ast.literal_eval(line.partition(' ')[2])[:3]
    del records[1]['dialog']
    (tmp_path / 'dxy.txt').write_text(f'test {records!r}\n')
    assert len(readers.read_dxy(str(tmp_path / 'dxy.txt'), skipped)['test']) == 2
    (tmp_path / 'raw.txt').write_text(
        'id=1\nurl\n\nDialogue\n病人：\n头疼\n医生：\n多休息\n\nid=x\nurl\n\nDialogue\n病人：\n咳\n'
    )
    assert len(readers.read_covid_raw(str(tmp_path / 'raw.txt'), skipped)) == 1
    assert len(skipped) == 4 and skipped.to_json()['count'] == 4
    assert skipped.where[1].startswith(f'{tmp_path / "split.json"}:record 2:')
    assert skipped.where[2].startswith(f'{tmp_path / "dxy.txt"}:1 record 2: malformed DXY record')
    assert skipped.where[3].startswith(f'{tmp_path / "raw.txt"}:10:')


def test_empty_file_error_names_file(tmp_path):
    for content in (b'', b'\n \n'):
        (tmp_path / 'empty.txt').write_bytes(content)
        with pytest.raises(DataError, match=f'{tmp_path / "empty.txt"}: file is empty'):
            readers.read_covid_raw(str(tmp_path / 'empty.txt'), Skipped())


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    final = tmp_path / 'set'
    final.mkdir()
    (final / 'train.bin').write_bytes(b'old')
    (final / 'meta.json').write_text('{}')  # a data folder, which a build may replace
    with pytest.raises(RuntimeError):
        with atomic_dir(str(final)) as folder:
            Path(folder, 'train.bin').write_bytes(b'new, half')
            raise RuntimeError('failed mid-build')
    # (.set.lock: the lock file a build holds the folder by)
    assert sorted(os.listdir(tmp_path)) == ['.set.lock', 'set'] and (final / 'train.bin').read_bytes() == b'old'
    with atomic_dir(str(final)) as folder:
        Path(folder, 'train.bin').write_bytes(b'new')
        Path(folder, 'meta.json').write_text('{}')
    assert sorted(os.listdir(tmp_path)) == ['.set.lock', 'set'] and (final / 'train.bin').read_bytes() == b'new'
    with pytest.raises(TypeError):
        atomic_write(str(final / 'train.bin'), 'not bytes')
    assert sorted(os.listdir(final)) == ['meta.json', 'train.bin'] and (final / 'train.bin').read_bytes() == b'new'


# --- sources -----------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_loopback_server_and_file_url(tmp_path, monkeypatch):
    mirror = tmp_path / 'mirror'
    (mirror / 'medical_book').mkdir(parents=True)
    (mirror / 'medical_book' / 'fever.txt').write_text('第一章 总论\n传染病是指由病原微生物感染人体后产生的疾病。\n')
    handler = functools.partial(QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv('CMED_DATA_URL', f'http://127.0.0.1:{server.server_port}')
        monkeypatch.delenv('CMED_DATA', raising=False)
        raw = tmp_path / 'raw'
        path = source_file('medical_book/fever.txt', src=str(tmp_path / 'empty'), raw_dir=str(raw))
        assert path == str(raw / 'medical_book' / 'fever.txt')
        assert Path(path).read_bytes() == (mirror / 'medical_book' / 'fever.txt').read_bytes()
        with pytest.raises(DataError, match='could not download .*/medical_book/missing.txt'):
            download(f'http://127.0.0.1:{server.server_port}/medical_book/missing.txt', str(raw / 'missing.txt'))
        assert sorted(os.listdir(raw / 'medical_book')) == ['fever.txt'] and not (raw / 'missing.txt').exists()
    finally:
        server.shutdown()
    download((mirror / 'medical_book' / 'fever.txt').as_uri(), str(tmp_path / 'copy.txt'))
    assert (tmp_path / 'copy.txt').read_bytes() == (mirror / 'medical_book' / 'fever.txt').read_bytes()
    assert source_file('medical_book/fever.txt', src=str(DATA)) == str(DATA / 'medical_book' / 'fever.txt')


# --- splits ------------------------------------------------------------------------------------------------


def test_stratified_split_deterministic_and_proportional():
    rows = readers.read_department(str(DATA / 'department_qa/im_sample_gb18030.csv'), Skipped())
    labels = [r['department'] for r in rows]
    a, b = (stratified_split(labels, {'val': 0.1, 'test': 0.1}, seed=1337) for _ in range(2))
    assert a == b and a != stratified_split(labels, {'val': 0.1, 'test': 0.1}, seed=1)
    assert sorted(a['train'] + a['val'] + a['test']) == list(range(len(rows)))
    for name in set(labels):
        n = labels.count(name)
        assert sum(labels[i] == name for i in a['val']) == sum(labels[i] == name for i in a['test']) == round(n * 0.1)
    assert {labels[i] for i in a['test']} == set(labels)  # even 风湿免疫科 (18 questions) is in the test split


def test_no_covid_val_test_dialogue_in_pretraining_text():
    skipped = Skipped()
    kept, report, _ = readers.covid_pretraining_consultations(str(DATA), skipped)
    kept_text = readers._content(dialogue_text(turns) for turns in kept)

    def descriptions(split):
        dialogues = readers.read_covid_split(str(DATA / readers.COVID_SPLIT_FILES[split]), skipped)
        return [readers._content(turns[0][1])[:20] for turns in dialogues if len(readers._content(turns[0][1])) >= 20]

    held_out = descriptions('val') + descriptions('test')
    assert len(held_out) > 200 and not [d for d in held_out if d in kept_text]
    train = descriptions('train')
    assert sum(d in kept_text for d in train) > 0.9 * len(train)  # the training dialogues stay
    assert report['val_test_removed'] >= 218 and len(skipped) == 0


# --- the scripts, end to end on a small source folder --------------------------------------------------------


@pytest.fixture
def small_src(tmp_path):
    src = tmp_path / 'src'
    for folder in ('covid_dialog_zh', 'dxy_dialog', 'department_qa', 'medical_book'):
        (src / folder).mkdir(parents=True)
    (src / 'medical_lexicon').symlink_to(LEXICON)
    (src / 'imcs21').symlink_to(DATA / 'imcs21')  # read whole: its val/test dialogues are held out of pretraining
    raw = shared_text('covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt')
    (src / readers.COVID_RAW).write_text(raw[: raw.index('id=16\n')])
    for split, rel in readers.COVID_SPLIT_FILES.items():
        (src / rel).write_text(json.dumps(json.loads(shared_text(rel))[:6], ensure_ascii=False))
    lines = shared_text(readers.DXY_FILE).split('\n')
    (src / readers.DXY_FILE).write_text(
        ''.join(
            f'{line.partition(" ")[0]} {ast.literal_eval(line.partition(" ")[2])[:30]!r}\n' for line in lines if line
        )
    )
    rows = qa_rows(150)
    rows.insert(7, '消化科,,没有标题,回答')  # line 8: an empty title
    (src / readers.DEPARTMENT_FILE).write_bytes('\n'.join(rows).encode('gb18030'))
    (src / 'medical_book' / 'fever.txt').write_text('\n'.join(shared_text('medical_book/fever.txt').split('\n')[:40]))
    return src


def run_script(name, *args):
    result = subprocess.run([sys.executable, '-m', f'prepare.{name}', *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_scripts_build_every_set(small_src, tmp_path):
    out = tmp_path / 'data'
    stdout = run_script(
        'pretrain', '--src', str(small_src), '--out', str(out / 'pretrain'), '--tokenizer', 'char', '--workers', '1'
    )
    assert 'chars/s' in stdout
    tok = Tokenizer.load(str(out / 'pretrain' / 'tokenizer.model'))
    meta = json.loads((out / 'pretrain' / 'meta.json').read_text())
    assert meta['vocab_size'] == tok.vocab_size and meta['special_ids']['eot'] == tok.eot_id
    for split in ('train', 'val'):
        ids = np.fromfile(out / 'pretrain' / f'{split}.bin', dtype=np.uint16)
        lexical = np.fromfile(out / 'pretrain' / f'{split}.lex.bin', np.uint8)
        assert len(ids) == meta['splits'][split]['tokens'] == len(lexical)
        assert ids[-1] == tok.eot_id and (ids == tok.eot_id).sum() == meta['splits'][split]['records']
    common = ['--src', str(small_src), '--tokenizer_model', str(out / 'pretrain' / 'tokenizer.model'), '--workers', '1']
    for name in ('covid', 'dxy', 'department'):
        run_script(name, *common, '--out', str(out / name))
        meta = json.loads((out / name / 'meta.json').read_text())
        n_labels = len(meta['label_names'])
        # the labels are the distinct departments of the well-formed rows of the small file (covid has none)
        rows = list(csv.reader(io.StringIO((small_src / readers.DEPARTMENT_FILE).read_bytes().decode('gb18030'))))[1:]
        departments = {r[0] for r in rows if len(r) == 4 and all(field.strip() for field in r)}
        assert n_labels == {'covid': 0, 'dxy': 5, 'department': len(departments)}[name]
        if name != 'covid':
            assert sorted(meta['label_names']) == meta['label_names'] and len(set(meta['label_names'])) == n_labels
        if name == 'department':
            assert set(meta['label_names']) == departments
        assert (out / name / 'tokenizer.model').read_bytes() == (out / 'pretrain' / 'tokenizer.model').read_bytes()
        for split in ('train', 'val', 'test'):
            ids = np.fromfile(out / name / f'{split}.bin', dtype=np.uint16)
            offsets, labels = np.load(out / name / f'{split}.offsets.npy'), np.load(out / name / f'{split}.labels.npy')
            assert offsets[-1] == len(ids) == len(np.fromfile(out / name / f'{split}.mask.bin', np.uint8))
            assert len(labels) == len(offsets) - 1 == meta['splits'][split]['examples']
            assert (ids[offsets[1:] - 1] == tok.eot_id).all() and labels.max() < max(n_labels, 1)
    skipped = json.loads((out / 'department' / 'meta.json').read_text())['skipped']
    assert skipped['count'] == 1 and skipped['where'][0].startswith(f'{small_src / readers.DEPARTMENT_FILE}:8:')
    first = np.load(out / 'department' / 'test.offsets.npy')[1]
    ids = np.fromfile(out / 'department' / 'test.bin', dtype=np.uint16)[:first]
    assert tok.decode(ids.tolist()).startswith('<patient>') and tok.decode(ids.tolist()).endswith('<eot>')
