"""prepare/corpus.py: every recognised format from a small fixture written here and from the real shared files,
annotations as per-character entity ids, and clear errors for what is not recognised."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare.corpus import corpus_files, read_corpus_file  # noqa: E402
from prepare.sources import DataError, Skipped  # noqa: E402
from test_prepare import DATA  # noqa: E402


def read(path, **options):
    skipped, report = Skipped(), {}
    return list(read_corpus_file(str(path), skipped, report, **options)), skipped, report


@pytest.mark.parametrize(
    'record, text',
    [
        ({'text': '发烧三天了。'}, '发烧三天了。'),
        (
            {'conversations': [{'from': 'human', 'value': '咳嗽怎么办？'}, {'from': 'gpt', 'value': '多喝水。'}]},
            '<patient>咳嗽怎么办?<doctor>多喝水。',
        ),
        ({'instruction': '头痛', 'input': '两天了', 'output': '注意休息'}, '<patient>头痛\n两天了<doctor>注意休息'),
        ({'questions': ['腹泻吗？'], 'answers': ['吃蒙脱石散']}, '<patient>腹泻吗?<doctor>吃蒙脱石散'),
        (['病人：孩子发烧', '医生：多少度？'], '<patient>孩子发烧<doctor>多少度?'),
    ],
)
def test_each_json_record_shape(tmp_path, record, text):
    path = tmp_path / 'corpus.jsonl'
    path.write_text(json.dumps(record, ensure_ascii=False) + '\n', encoding='utf-8')
    documents, skipped, report = read(path)
    assert [d.text for d in documents] == [text] and len(skipped) == 0 and report['documents'] == 1
    assert documents[0].line == 1 and documents[0].entity_chars is None


def test_an_unknown_record_names_file_line_and_the_shapes(tmp_path):
    path = tmp_path / 'corpus.jsonl'
    path.write_text('{"text": "好"}\n{"prompt": "?", "completion": "!"}\n', encoding='utf-8')
    with pytest.raises(DataError, match=r'corpus.jsonl:2: a record of an unknown shape .*ShareGPT'):
        read(path)


def test_a_broken_line_is_skipped_and_counted_and_reading_is_lazy(tmp_path):
    path = tmp_path / 'corpus.jsonl'
    path.write_text('{"text": "第一篇"}\n{"text": "第二篇"\n{"text": "第三篇"}\n', encoding='utf-8')
    documents, skipped, _ = read(path)
    assert [d.text for d in documents] == ['第一篇', '第三篇']
    assert len(skipped) == 1 and skipped.where[0].startswith(f'{path}:2: not valid JSON')
    skipped, report = Skipped(), {}
    assert next(read_corpus_file(str(path), skipped, report)).text == '第一篇' and len(skipped) == 0  # one line read


def test_text_files_by_block_line_or_file(tmp_path):
    path = tmp_path / 'book.txt'
    path.write_text('第一章\n发热\n\n\n第二章\n咳嗽\n', encoding='utf-8')
    assert [(d.text, d.line) for d in read(path)[0]] == [('第一章\n发热', 1), ('第二章\n咳嗽', 5)]
    assert [d.text for d in read(path, txt_document='line')[0]] == ['第一章', '发热', '第二章', '咳嗽']
    assert [d.text for d in read(path, txt_document='file')[0]] == ['第一章\n发热\n第二章\n咳嗽']


def test_csv_encodings_are_detected(tmp_path):
    rows = 'department,title,ask,answer\n内科,头痛,头痛两天,休息\n内科,,,\n'
    for encoding, expected in (('utf-8-sig', 'utf-8-sig'), ('gb18030', 'gb18030'), ('utf-8', 'utf-8-sig')):
        path = tmp_path / f'{encoding}.csv'
        path.write_bytes(rows.encode(encoding))
        documents, skipped, report = read(path)
        assert report['encoding'] == expected
        assert [d.text for d in documents] == ['<patient>头痛<sep>头痛两天<doctor>休息']
        assert len(skipped) == 1 and ':3: a row without' in skipped.where[0]


def test_unknown_extensions_missing_paths_and_empty_files(tmp_path):
    (tmp_path / 'notes.docx').write_bytes(b'x')
    with pytest.raises(DataError, match=r'notes.docx: not a corpus file .*\.jsonl'):
        corpus_files([str(tmp_path)])
    with pytest.raises(DataError, match='no such file or folder'):
        corpus_files([str(tmp_path / 'nothing')])
    (tmp_path / 'empty.jsonl').write_text('\n', encoding='utf-8')
    with pytest.raises(DataError, match='empty.jsonl: file is empty'):
        read(tmp_path / 'empty.jsonl')


def test_the_shared_files():
    covid, _, report = read(DATA / 'covid_dialog_zh' / 'COVID-Dialogue-Dataset-Chinese.txt')
    assert report['shape'] == 'MedDialog-CN raw dump' and len(covid) == 1393 and covid[0].line == 2  # line 1 is blank
    assert covid[0].text.startswith('<patient>') and '<doctor>' in covid[0].text
    qa, _, report = read(DATA / 'department_qa' / 'im_sample_gb18030.csv')
    assert report['encoding'] == 'gb18030' and len(qa) == 7644
    book, _, _ = read(DATA / 'medical_book' / 'fever.txt')
    assert len(book) == 8 and '传染' in book[0].text
    imcs, _, report = read(DATA / 'imcs21' / 'attr_dev.json')
    assert report['shape'] == 'IMCS-21' and len(imcs) == 203 and all(d.entity_chars is not None for d in imcs)


def test_chip_mentions_become_entity_ids():
    chip, _, _ = read(DATA / 'chip_mdcfnpc' / 'fix_badcase.jsonl')
    first = chip[0]
    assert len(first.entity_chars) == len(first.text)
    marked = ''.join(c if t else '_' for c, t in zip(first.text, first.entity_chars))
    # the record's own ner ranges: 腹痛 [48, 50) and 流血 [43, 45) of its first utterance, after '<patient>'
    assert marked[9 + 43 : 9 + 45] == '流血' and marked[9 + 48 : 9 + 50] == '腹痛'
    assert marked[:9] == '_' * 9  # the speaker piece carries no entity


def test_imcs_bio_labels_become_entity_ids(tmp_path):
    record = {
        'self_report': '孩子咳嗽',
        'dialogue': [
            {'speaker': '医生', 'sentence': '有发烧吗', 'BIO_label': 'O B-Symptom I-Symptom O'},
            {'speaker': '患者', 'sentence': '没有', 'BIO_label': 'O O'},
        ],
    }
    path = tmp_path / 'imcs.json'
    path.write_text(json.dumps({'1': record}, ensure_ascii=False), encoding='utf-8')
    [document], _, _ = read(path)
    assert document.text == '<patient>孩子咳嗽<doctor>有发烧吗<patient>没有'
    # the self report has no labels (zeros); 发烧 is B/I in the doctor's sentence
    expected = np.zeros(len(document.text), dtype=np.uint8)
    start = document.text.index('发烧')
    expected[start : start + 2] = 1
    assert document.entity_chars.tolist() == expected.tolist()


def test_a_corpus_folder_builds(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    lines = [json.dumps({'text': f'第{i}篇：孩子发烧{i}天，咳嗽有痰。'}, ensure_ascii=False) for i in range(60)]
    (corpus / 'a.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    (corpus / 'b.json').write_text((DATA / 'imcs21' / 'attr_dev.json').read_text(encoding='utf-8'), encoding='utf-8')
    out = tmp_path / 'out'
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'prepare.pretrain',
            '--corpus',
            str(corpus),
            '--out',
            str(out),
            '--src',
            str(DATA),
            '--tokenizer',
            'char',
            '--workers',
            '1',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-1500:]
    meta = json.loads((out / 'meta.json').read_text(encoding='utf-8'))
    assert meta['files'][str(corpus / 'b.json')]['shape'] == 'IMCS-21'
    assert sum(meta['documents'][str(corpus / name)]['read'] for name in ('a.jsonl', 'b.json')) == 60 + 203
    entity = np.fromfile(out / 'train.ent.bin', dtype=np.uint8)
    assert 0.02 < entity.mean() < 0.2  # gold symptom tags (and lexicon tags on a.jsonl)


# ----------------------------------------------------------------------------- encodings


def test_a_latin1_csv_is_refused_naming_encoding_and_read_when_given(tmp_path):
    # German Latin-1 bytes decode as GB18030 too, into rare characters (Fräulein -> Fr鋟lein): never silently
    path = tmp_path / 'qa.csv'
    path.write_bytes('ask,answer\nFräulein Müller hätte gern Bücher,Schön für Sie\n'.encode('latin-1') * 3)
    with pytest.raises(
        DataError,
        match=rf'{path}: byte 13 is not UTF-8, and read as GB18030 .* rare .*'
        rf'--encoding=latin-1',
    ):
        read(path)
    documents, _, report = read(path, encoding='latin-1')
    assert (
        report['encoding'] == 'iso8859-1'
        and documents[0].text == '<patient>Fräulein Müller hätte gern Bücher<doctor>Schön für Sie'
    )
    with pytest.raises(DataError, match='--encoding=latin1x: not an encoding'):
        read(path, encoding='latin1x')


@pytest.mark.parametrize(
    'name, data, words',
    [
        ('notes.txt', '发烧三天\n\n咳嗽\n'.encode('gb18030'), None),  # GB18030 text: detected
        ('notes.txt', '发烧三天\n\n咳嗽\n'.encode('utf-16'), None),  # UTF-16 with its byte-order mark: detected
        ('notes.txt', b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'byte 8 is NUL: a binary file'),
        ('notes.txt', '发烧三天\n'.encode('utf-8') * 3 + '咳'.encode('utf-8')[:2], 'notes.txt:4: not valid utf-8-sig'),
        ('notes.jsonl', '{"text": "发烧"}\n'.encode('gb18030'), None),
    ],
)
def test_every_corpus_file_has_its_encoding_detected_or_is_refused_by_line(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    if words is None:
        documents, _, _ = read(path)
        assert [d.text for d in documents] in (['发烧三天', '咳嗽'], ['发烧'])
    else:
        with pytest.raises(DataError, match=words) as refused:
            read(path)
        assert '--encoding' in str(refused.value) and str(path) in str(refused.value)


# ----------------------------------------------------------------------------- records and links


@pytest.mark.parametrize(
    'record, why',
    [
        ({'conversations': [{'from': 'human'}, {'from': 'gpt', 'value': '多喝水'}]}, "KeyError: 'value'"),
        ({'conversations': ['发烧怎么办', '多喝水']}, 'AttributeError'),
        ({'instruction': None, 'output': '多喝水'}, 'a record without a question or an answer'),
        ({'instruction': '发烧', 'output': None}, 'TypeError'),
        ({'questions': 5, 'answers': ['多喝水']}, 'TypeError'),
        ({'dialog_info': [{'text': '发烧'}]}, "KeyError: 'sender'"),
        ({'dialogue': [{'speaker': '医生'}]}, "KeyError: 'sentence'"),
    ],
)
def test_near_miss_records_are_skipped_and_counted_with_file_and_line(tmp_path, record, why):
    path = tmp_path / 'corpus.jsonl'
    lines = [{'text': '第一篇'}, record, {'text': '第三篇'}]
    path.write_text(''.join(json.dumps(line, ensure_ascii=False) + '\n' for line in lines), encoding='utf-8')
    documents, skipped, _ = read(path)
    assert [d.text for d in documents] == ['第一篇', '第三篇']
    assert len(skipped) == 1 and skipped.where[0].startswith(f'{path}:2: ') and why in skipped.where[0], skipped.where


def test_dangling_and_self_looping_links_are_named(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'a.txt').write_text('发烧\n', encoding='utf-8')
    (corpus / 'gone.txt').symlink_to(tmp_path / 'deleted.txt')
    with pytest.raises(DataError, match=rf'{corpus / "gone.txt"}: a symbolic link to no file .*fix or remove it'):
        corpus_files([str(corpus)])
    (corpus / 'gone.txt').unlink()
    (corpus / 'loop.txt').symlink_to(corpus / 'loop.txt')
    with pytest.raises(DataError, match=rf'{corpus / "loop.txt"}: a symbolic link to no file'):
        corpus_files([str(corpus)])


# ----------------------------------------------------------------------------- the build's output folder


def pretrain(monkeypatch, *args):
    """python -m prepare.pretrain in this process (as exit_on_data_error runs it): the one line it exits with,
    or None when it succeeds."""
    from prepare import pretrain as script
    from prepare.dataset import exit_on_data_error

    monkeypatch.setattr(
        sys, 'argv', ['prepare.pretrain', '--src', str(DATA), '--tokenizer', 'char', '--workers', '1', *map(str, args)]
    )
    try:
        exit_on_data_error(script.main)
    except SystemExit as refused:
        assert isinstance(refused.code, str) and '\n' not in refused.code, refused.code
        return refused.code
    return None


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def small_corpus(tmp_path, n=60):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    lines = [json.dumps({'text': f'第{i}篇：孩子发烧{i}天，咳嗽有痰。'}, ensure_ascii=False) for i in range(n)]
    (corpus / 'a.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return corpus


def test_an_out_that_is_in_or_holds_the_corpus_is_refused_before_the_work(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path)
    before = files(corpus)
    for out in (corpus, corpus / 'built', tmp_path):  # the corpus, a folder in it, a folder holding it
        line = pretrain(monkeypatch, '--corpus', corpus, '--out', out)
        assert line.startswith(f'error: --out {out} and --corpus {corpus} overlap'), line
        assert files(corpus) == before and not (corpus / 'built').exists()


def test_an_out_that_is_not_a_data_folder_is_never_replaced(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path)
    mine = tmp_path / 'documents'
    mine.mkdir()
    (mine / 'letter.txt').write_text('mine', encoding='utf-8')
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', mine)
    assert f'{mine} is not a folder this command built (no meta.json in it)' in line and '--out' in line
    assert files(mine) == {'letter.txt': b'mine'} and not (tmp_path / 'documents.tmp').exists()


def test_a_second_build_into_a_held_out_is_refused_and_keeps_the_firsts_work(tmp_path, monkeypatch):
    from prepare.dataset import hold

    corpus, out = small_corpus(tmp_path), tmp_path / 'data' / 'mine'
    (tmp_path / 'data' / 'mine.tmp').mkdir(parents=True)  # the first build's work in progress
    (tmp_path / 'data' / 'mine.tmp' / 'train.bin').write_bytes(b'first')
    with hold(str(tmp_path / 'data' / '.mine.lock'), str(out), '--out'):  # the first build holds --out
        line = pretrain(monkeypatch, '--corpus', corpus, '--out', out)
    assert f'{out} is being built by another process (pid {os.getpid()}' in line and 'another --out' in line
    assert (tmp_path / 'data' / 'mine.tmp' / 'train.bin').read_bytes() == b'first' and not out.exists()
    # a holder killed with -9 leaves no stuck lock: the system releases it with the process
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import time; from prepare.dataset import hold; '
            f'lock = hold({str(tmp_path / "data" / ".mine.lock")!r}, "x", "--out"); '
            'print("held", flush=True); time.sleep(60)',
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == 'held\n'
    holder.kill()
    holder.wait()
    hold(str(tmp_path / 'data' / '.mine.lock'), str(out), '--out').close()


def test_a_leftover_old_folder_is_refused_before_the_work_naming_what_to_do(tmp_path, monkeypatch):
    corpus, out = small_corpus(tmp_path), tmp_path / 'set'
    (tmp_path / 'set.old').mkdir()
    (tmp_path / 'set.old' / 'meta.json').write_text('{"the": "build before"}')
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', out)
    assert f'{tmp_path / "set.old"} is left by an interrupted build' in line and f'rename it back to {out}' in line
    assert files(tmp_path / 'set.old') == {'meta.json': b'{"the": "build before"}'} and not out.exists()


def test_a_disk_without_room_for_the_build_is_refused_before_the_work(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', tmp_path / 'out')
    assert 'out is on a disk with 0.00 GB free' in line and 'free some space, or give --out on another disk' in line
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.tmp').exists()


def test_an_out_in_a_folder_it_may_not_write_in_is_refused_before_the_work(tmp_path, monkeypatch, unwritable_folder):
    from prepare import pretrain as script

    corpus = small_corpus(tmp_path)
    read = []
    monkeypatch.setattr(script, 'held_out_dialogues', lambda *args: read.append(args))  # the build's first reading
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', unwritable_folder / 'set')
    assert line == (
        f'error: --out {unwritable_folder / "set"}: this process may not write in {unwritable_folder} (a read-only '
        f'disk or folder): give --out in a folder you may write to'
    )
    assert read == [] and not (unwritable_folder / 'set').exists()


def test_a_disk_that_fills_during_the_build_is_one_line_and_keeps_the_previous_folder(tmp_path, monkeypatch):
    from prepare import stream

    corpus, out = small_corpus(tmp_path), tmp_path / 'out'
    out.mkdir()
    (out / 'meta.json').write_text('{"the": "previous build"}')

    def full_disk(*args):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'out.tmp' / 'train.bin'))

    monkeypatch.setattr(stream, 'SplitFiles', full_disk)
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', out)
    assert line.startswith('error: [Errno 28] No space left on device') and 'give --out on another disk' in line
    assert files(out) == {'meta.json': b'{"the": "previous build"}'} and not (tmp_path / 'out.tmp').exists()


def test_an_out_with_a_trailing_slash_builds_beside_not_inside(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path)
    assert pretrain(monkeypatch, '--corpus', corpus, '--out', f'{tmp_path / "built"}/') is None
    assert (tmp_path / 'built' / 'meta.json').is_file() and not (tmp_path / 'built' / '.tmp').exists()
    assert sorted(os.listdir(tmp_path)) == ['.built.lock', 'built', 'corpus']


def test_a_corpus_too_small_for_a_validation_split_is_refused(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path, n=10)  # 5% of the documents go to val, by a hash of the text: here none
    line = pretrain(monkeypatch, '--corpus', corpus, '--out', tmp_path / 'out')
    assert line == 'error: none of the 10 documents kept went to the val split (5% go to val): give a larger corpus'
    assert sorted(os.listdir(tmp_path)) == ['.out.lock', 'corpus']


def test_a_build_killed_mid_way_leaves_the_previous_folder_and_the_next_build_runs(tmp_path, monkeypatch):
    corpus, out = small_corpus(tmp_path, n=60), tmp_path / 'out'
    (corpus / 'big.txt').write_text(
        ''.join(f'第{i}例：孩子发烧三天了，咳嗽有痰。\n\n' for i in range(200_000)), encoding='utf-8'
    )  # minutes of work: killed long before it is done
    out.mkdir()
    (out / 'meta.json').write_text('{"the": "previous build"}')
    build = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'prepare.pretrain',
            '--corpus',
            str(corpus),
            '--out',
            str(out),
            '--src',
            str(DATA),
            '--tokenizer',
            'char',
            '--workers',
            '1',
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spool = tmp_path / 'out.tmp' / 'documents.spool.jsonl'
    for _ in range(1200):  # at most two minutes for the build to start spooling
        if spool.exists() or build.poll() is not None:
            break
        time.sleep(0.1)
    build.kill()
    assert build.wait() == -9, 'the build ended before it could be killed'
    assert files(out) == {'meta.json': b'{"the": "previous build"}'}
    (corpus / 'big.txt').unlink()
    assert pretrain(monkeypatch, '--corpus', corpus, '--out', out) is None  # the lock died with the process
    assert json.loads((out / 'meta.json').read_text(encoding='utf-8'))['splits']['train']['records'] > 0
    assert not (tmp_path / 'out.tmp').exists()  # the killed build's temporary folder is gone
