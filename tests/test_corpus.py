"""prepare/corpus.py: every recognised format from a small fixture written here and from the real shared files,
annotations as per-character entity ids, and clear errors for what is not recognised."""
import json
import subprocess
import sys
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


@pytest.mark.parametrize('record, text', [
    ({'text': '发烧三天了。'}, '发烧三天了。'),
    ({'conversations': [{'from': 'human', 'value': '咳嗽怎么办？'}, {'from': 'gpt', 'value': '多喝水。'}]},
     '<patient>咳嗽怎么办?<doctor>多喝水。'),
    ({'instruction': '头痛', 'input': '两天了', 'output': '注意休息'}, '<patient>头痛\n两天了<doctor>注意休息'),
    ({'questions': ['腹泻吗？'], 'answers': ['吃蒙脱石散']}, '<patient>腹泻吗?<doctor>吃蒙脱石散'),
    (['病人：孩子发烧', '医生：多少度？'], '<patient>孩子发烧<doctor>多少度?'),
])
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
    assert marked[9 + 43:9 + 45] == '流血' and marked[9 + 48:9 + 50] == '腹痛'
    assert marked[:9] == '_' * 9  # the speaker piece carries no entity


def test_imcs_bio_labels_become_entity_ids(tmp_path):
    record = {'self_report': '孩子咳嗽', 'dialogue': [
        {'speaker': '医生', 'sentence': '有发烧吗', 'BIO_label': 'O B-Symptom I-Symptom O'},
        {'speaker': '患者', 'sentence': '没有', 'BIO_label': 'O O'}]}
    path = tmp_path / 'imcs.json'
    path.write_text(json.dumps({'1': record}, ensure_ascii=False), encoding='utf-8')
    [document], _, _ = read(path)
    assert document.text == '<patient>孩子咳嗽<doctor>有发烧吗<patient>没有'
    # the self report has no labels (zeros); 发烧 is B/I in the doctor's sentence
    expected = np.zeros(len(document.text), dtype=np.uint8)
    start = document.text.index('发烧')
    expected[start:start + 2] = 1
    assert document.entity_chars.tolist() == expected.tolist()


def test_a_corpus_folder_builds(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    lines = [json.dumps({'text': f'第{i}篇：孩子发烧{i}天，咳嗽有痰。'}, ensure_ascii=False) for i in range(60)]
    (corpus / 'a.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    (corpus / 'b.json').write_text((DATA / 'imcs21' / 'attr_dev.json').read_text(encoding='utf-8'), encoding='utf-8')
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, '-m', 'prepare.pretrain', '--corpus', str(corpus), '--out', str(out),
                             '--src', str(DATA), '--tokenizer', 'char', '--workers', '1'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    meta = json.loads((out / 'meta.json').read_text(encoding='utf-8'))
    assert meta['files'][str(corpus / 'b.json')]['shape'] == 'IMCS-21'
    assert sum(meta['documents'][str(corpus / name)]['read'] for name in ('a.jsonl', 'b.json')) == 60 + 203
    entity = np.fromfile(out / 'train.ent.bin', dtype=np.uint8)
    assert 0.02 < entity.mean() < 0.2  # gold symptom tags (and lexicon tags on a.jsonl)
