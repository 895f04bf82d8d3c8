"""prepare/dialogues.py: example sets from a corpus of dialogues in every shape prepare/corpus.py reads
(tests/fixtures/dialogues/ holds one small file of each), and finetune.py, eval.py and sample.py on such a set."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluator
import finetune
import sample
from checkpoint import save_checkpoint, tokenizer_record
from example_sets import entity_runs, load_split
from model import GPT, GPTConfig
from prepare import dialogues
from prepare.corpus import corpus_files, read_corpus_file
from prepare.dataset import exit_on_data_error
from prepare.sources import Skipped
from prepare.text import normalize
from test_prepare import small_src  # noqa: F401 (a fixture: the built-in sources, for the pretraining build)
from tokenizer import Tokenizer, train_char

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'dialogues'
SHAPES = {
    'chip.jsonl': 'CHIP-MDCFNPC',
    'consultations.jsonl': 'ShareGPT',
    'imcs.json': 'IMCS-21',
    'instruction.jsonl': 'instruction',
    'meddialog.txt': 'MedDialog-CN raw dump',
    'qa.csv': 'question-answer table',
    'questions_answers.jsonl': 'questions and answers',
    'utterances.json': 'utterances prefixed 病人：/医生：',
}
LEXICON = {
    'symptom': ['咳嗽', '发烧', '头痛', '腹泻', '呕吐'],
    'disease': ['感冒', '支气管炎'],
    'drug': ['布洛芬', '蒙脱石散', '退烧药'],
    'check': ['血常规'],
    'department': ['呼吸科'],
}


@pytest.fixture(scope='module')
def src(tmp_path_factory):
    """A source folder with a small medical lexicon (the entity dictionary) and nothing else."""
    folder = tmp_path_factory.mktemp('src')
    (folder / 'medical_lexicon').mkdir()
    for name, terms in LEXICON.items():
        (folder / 'medical_lexicon' / f'{name}.txt').write_text('\n'.join(terms) + '\n', encoding='utf-8')
    return folder


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    lines = [normalize(line) for path in sorted(FIXTURES.iterdir()) for line in path.read_text().splitlines()]
    path = tmp_path_factory.mktemp('tok') / 'tokenizer.model'
    train_char(lines + ['笔记天气晴朗'], str(path), vocab_size=800)
    return path


def build(src, tokenizer, out, *corpus, extra=()):
    common = ['--src', str(src), '--tokenizer', str(tokenizer), '--workers', '1']
    dialogues.main(['--corpus', *map(str, corpus), '--out', str(out), *common, *extra])
    return json.loads((Path(out) / 'meta.json').read_text(encoding='utf-8'))


def refused(*args):
    """The one-line message a build that is refused ends with."""
    with pytest.raises(SystemExit) as refusal:
        exit_on_data_error(lambda: dialogues.main([str(arg) for arg in args]))
    return str(refusal.value.code)


def texts(folder, split):
    """Each example of the split decoded: source + target + <eot>."""
    tok = Tokenizer.load(str(Path(folder) / 'tokenizer.model'))
    return [tok.decode(ex['tokens'].tolist()) for ex in load_split(str(folder), split)]


def sharegpt(turns, **fields):
    speakers = ('human', 'gpt') * len(turns)
    return json.dumps(
        dict(conversations=[dict(zip(('from', 'value'), pair)) for pair in zip(speakers, turns)], **fields),
        ensure_ascii=False,
    )


# ----- what a set holds ------------------------------------------------------------------------------


def test_every_dialogue_shape_becomes_one_example_per_doctor_turn(src, tokenizer, tmp_path):
    out = tmp_path / 'all'
    meta = build(src, tokenizer, out, FIXTURES)
    assert {Path(path).name: report['shape'] for path, report in meta['files'].items()} == SHAPES
    tok = Tokenizer.load(str(out / 'tokenizer.model'))
    doctor_turns = sum(
        document.text.count('<doctor>')
        for path in corpus_files([FIXTURES])
        for document in read_corpus_file(path, Skipped(), {})
    )
    n_examples = 0
    for split in dialogues.SPLITS:
        for ex in load_split(str(out), split):
            start = int(np.argmax(ex['mask']))  # the target: the doctor's utterance and <eot>, nothing else
            assert ex['tokens'][start - 1] == tok.doctor_id and ex['tokens'][-1] == tok.eot_id
            assert ex['mask'][start:].all() and not ex['mask'][:start].any() and ex['label'] == -1
            assert not np.isin(ex['tokens'][start:-1], [tok.patient_id, tok.doctor_id, tok.eot_id]).any()
            n_examples += 1
    assert n_examples == doctor_turns == sum(meta['splits'][split]['examples'] for split in dialogues.SPLITS)
    everything = '\n'.join(text for split in dialogues.SPLITS for text in texts(out, split))
    for reply in (
        '可能是感冒引起的头痛，可以吃布洛芬。<eot>',  # CHIP-MDCFNPC
        '建议查血常规和胸片，排除肺炎。<eot>',  # instruction
        '<patient>高血压能喝酒吗？<doctor>最好不要喝酒，按时吃降压药。<eot>',  # questions and answers
        '<doctor>可以先调整作息，必要时到睡眠门诊。<eot>',  # 病人：/医生：
        '<patient>孩子拉肚子两天<doctor>大便是水样的吗？',  # IMCS-21: the self report opens it
        '<patient>不发烧，扁桃体不肿。<doctor>多喝水，少说话，可以含服润喉片。<eot>',  # MedDialog-CN
        '<patient>血糖高怎么办<sep>空腹血糖7.8，需要吃药吗？<doctor>建议复查并做糖耐量试验，控制饮食。<eot>',  # CSV
    ):
        assert normalize(reply) in everything, reply
    assert (out / 'tokenizer.model').read_bytes() == tokenizer.read_bytes()


def test_entity_ids_come_from_a_dialogues_own_annotations_else_from_the_lexicon(src, tokenizer, tmp_path):
    out = tmp_path / 'entities'
    meta = build(src, tokenizer, out, FIXTURES, extra=('--val_fraction', '0', '--test_fraction', '0'))
    assert meta['dialogues']['annotated'] == 4 and meta['entity_source'] == 'annotations where given, else lexicon'
    tok = Tokenizer.load(str(out / 'tokenizer.model'))
    marked = {}  # the opening words of a dialogue -> the texts its entity ids mark
    for ex in load_split(str(out), 'train'):
        text = tok.decode(ex['tokens'].tolist())
        runs = {tok.decode(list(run)) for run in entity_runs(ex['tokens'], ex['entity'])}
        marked.setdefault(text[len('<patient>') :][:6], set()).update(runs)
    assert marked['我头痛三天了'] == {'头痛', '发烧', '咳嗽', '感冒', '布洛芬'}  # CHIP-MDCFNPC's ner ranges
    assert marked['孩子拉肚子两'] == {'大便', '呕吐', '脱水'}  # IMCS-21's BIO labels (大便 is no lexicon term)
    assert marked['孩子发烧咳嗽'] == {'发烧'}  # its gold labels, not the lexicon's 退烧药
    assert marked['孩子咳嗽有痰'] == {'咳嗽', '支气管炎', '血常规'}  # ShareGPT: no annotations, the lexicon


def test_the_same_bytes_for_any_worker_count_and_chunk_size(src, tokenizer, tmp_path):
    one = build(src, tokenizer, tmp_path / 'one', FIXTURES, extra=('--chunk_docs', '1000'))
    two = build(src, tokenizer, tmp_path / 'two', FIXTURES, extra=('--workers', '2', '--chunk_docs', '3'))
    names = sorted(path.name for path in (tmp_path / 'one').iterdir())
    assert names == sorted(path.name for path in (tmp_path / 'two').iterdir()) and 'heldout.jsonl' in names
    for name in names:
        if name != 'meta.json':
            assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name
    run_facts = ('timings_s', 'chars_per_s', 'workers')
    assert {k: v for k, v in one.items() if k not in run_facts} == {k: v for k, v in two.items() if k not in run_facts}
    assert one['splits']['val']['examples'] and one['splits']['test']['examples']


def test_adding_dialogues_never_moves_one_between_splits(src, tokenizer, tmp_path):
    corpus_a = FIXTURES / 'consultations.jsonl'
    corpus_b = tmp_path / 'more.jsonl'
    corpus_b.write_text(
        '\n'.join(sharegpt([f'第{i}次复诊，血压{120 + i}。', f'血压{120 + i}还可以，继续服药。']) for i in range(60)),
        encoding='utf-8',
    )
    build(src, tokenizer, tmp_path / 'a', corpus_a)
    build(src, tokenizer, tmp_path / 'ab', corpus_b, FIXTURES / 'chip.jsonl', corpus_a)  # new files read first
    for split in dialogues.SPLITS:
        before, after = set(texts(tmp_path / 'a', split)), set(texts(tmp_path / 'ab', split))
        assert before and before < after, split
    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(20_000)]
    shares = Counter(dialogues.split_of(digest, 0.1, 0.2) for digest in digests)
    for split, share in zip(dialogues.SPLITS, (0.7, 0.1, 0.2)):
        assert abs(shares[split] / len(digests) - share) < 0.015, split


def test_exact_duplicate_dialogues_are_dropped_and_counted(src, tokenizer, tmp_path, capsys):
    lines = (FIXTURES / 'consultations.jsonl').read_text(encoding='utf-8').splitlines()[:5]
    first = tmp_path / 'first.jsonl'
    first.write_text('\n'.join(lines + lines[:2]), encoding='utf-8')  # two repeats in the file
    second = tmp_path / 'second.jsonl'
    second.write_text(  # one repeat of the first file, and one dialogue in two shapes (the same text once cleaned)
        '\n'.join(
            [
                lines[0],
                json.dumps(
                    {'instruction': '胃疼吃什么药？', 'input': '', 'output': '可以吃奥美拉唑。'}, ensure_ascii=False
                ),
                json.dumps({'questions': ['胃疼吃什么药?'], 'answers': ['可以吃奥美拉唑。']}, ensure_ascii=False),
            ]
        ),
        encoding='utf-8',
    )
    out = tmp_path / 'set'
    meta = build(src, tokenizer, out, first, second, extra=('--val_fraction', '0', '--test_fraction', '0'))
    assert (
        meta['dialogues']['read'] == 10 and meta['dialogues']['duplicates'] == 4 and meta['entity_source'] == 'lexicon'
    )
    assert meta['dialogues']['per_file'][str(first)] == {'read': 7, 'duplicates': 2, 'train': 5}
    assert meta['dialogues']['per_file'][str(second)] == {'read': 3, 'duplicates': 2, 'train': 1}
    assert meta['splits']['train']['records'] == 6 and len(set(texts(out, 'train'))) == len(texts(out, 'train'))
    assert '10 dialogues read from 2 file(s), 4 exact duplicates dropped' in capsys.readouterr().out
    assert not (out / 'val.bin').exists() and not (out / 'test.bin').exists()  # a fraction of 0: no such split
    assert (out / 'heldout.jsonl').read_text() == ''


def test_a_label_field_makes_a_classification_set(src, tokenizer, tmp_path):
    labelled = ['consultations.jsonl', 'instruction.jsonl', 'questions_answers.jsonl', 'qa.csv']
    corpus = [FIXTURES / name for name in labelled + ['utterances.json', 'chip.jsonl']]
    out = tmp_path / 'labelled'
    meta = build(src, tokenizer, out, *corpus, extra=('--label_field', 'department'))
    departments = {}  # the patient's first words -> the department of the record
    for name in labelled:
        for document in read_corpus_file(str(FIXTURES / name), Skipped(), {}):
            departments[document.text.split('<doctor>')[0]] = document.fields['department']
    assert meta['label_names'] == sorted(set(departments.values())) and meta['label_field'] == 'department'
    n_labelled = 0
    for split in dialogues.SPLITS:
        for ex, text in zip(load_split(str(out), split), texts(out, split)):
            opening = text.split('<doctor>')[0]
            if ex['label'] >= 0:  # a dialogue's first example carries its label, as in the built-in sets
                assert text.count('<doctor>') == 1 and meta['label_names'][ex['label']] == departments[opening]
                n_labelled += 1
    assert n_labelled == len(departments) == sum(meta['splits'][split]['records'] for split in dialogues.SPLITS)
    missing = [where.split(': ')[0] for where in meta['skipped']['where']]
    utterances, chip = corpus[-2:]
    assert missing == [f'{utterances}:record 1', f'{utterances}:record 2', f'{chip}:1', f'{chip}:2']
    assert all("no value of the label field 'department'" in where for where in meta['skipped']['where'])
    imcs = build(
        src,
        tokenizer,
        tmp_path / 'imcs',
        FIXTURES / 'imcs.json',
        extra=('--label_field=diagnosis', '--val_fraction=0', '--test_fraction=0'),
    )
    assert imcs['label_names'] == ['上呼吸道感染', '小儿腹泻'] and imcs['skipped']['count'] == 0


# ----- bad input ------------------------------------------------------------------------------------


def test_malformed_records_are_skipped_and_counted_with_file_and_line(src, tokenizer, tmp_path, capsys):
    good = (FIXTURES / 'consultations.jsonl').read_text(encoding='utf-8').splitlines()
    jsonl = tmp_path / 'bad.jsonl'
    jsonl.write_text(
        '\n'.join(
            [
                good[0],
                '{"conversations": [{"from": "human", "value": "头痛"}, {"from": "gpt"}]}',  # a turn without value
                '{"conversations": [',  # not JSON
                sharegpt(['只有病人在说话']),  # no doctor turn
                good[1],
                '{"instruction": "发烧怎么办", "output": null}',
            ]
        ),
        encoding='utf-8',
    )
    table = tmp_path / 'bad.csv'
    table.write_text('title,ask,answer\n头痛,头痛三天,多休息\n咳嗽,咳嗽一周,\n', encoding='utf-8')
    meta = build(src, tokenizer, tmp_path / 'set', jsonl, table, extra=('--val_fraction=0', '--test_fraction=0'))
    where = meta['skipped']['where']
    assert [w.split(': ')[0] for w in where] == [f'{jsonl}:2', f'{jsonl}:3', f'{jsonl}:4', f'{jsonl}:6', f'{table}:3']
    assert 'without a doctor turn' in where[2] and meta['dialogues']['read'] == 3
    printed = capsys.readouterr().out
    assert 'skipped 5 malformed records' in printed and all(w in printed for w in where)


def test_an_unknown_shape_or_no_dialogue_stops_the_build_and_leaves_the_folder_as_it_was(
    src, tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / 'set'
    build(src, tokenizer, out, FIXTURES / 'consultations.jsonl')
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    good = (FIXTURES / 'consultations.jsonl').read_text(encoding='utf-8').splitlines()
    files = {
        'unknown.jsonl': good[0] + '\n{"patient": "头痛", "reply": "多休息"}\n',
        'notes.txt': '今天天气晴朗。\n\n第二段。\n',
        'texts.jsonl': '{"text": "今天天气晴朗。"}\n',
        'patients.jsonl': sharegpt(['头痛三天']) + '\n' + sharegpt(['咳嗽一周']) + '\n',
        'one.jsonl': good[0] + '\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding='utf-8')
    common = ('--out', out, '--src', src, '--tokenizer', tokenizer, '--workers', '1')
    messages = {name: refused('--corpus', tmp_path / name, *common) for name in files}
    assert f'{tmp_path / "unknown.jsonl"}:2: a record of an unknown shape' in messages['unknown.jsonl']
    assert f'{tmp_path / "notes.txt"}:1: plain text, one document per block, not a dialogue' in messages['notes.txt']
    assert f'{tmp_path / "texts.jsonl"}:1: text, not a dialogue' in messages['texts.jsonl']
    patients = tmp_path / 'patients.jsonl'
    no_dialogue = f'no dialogue to cut examples from in {patients} (the first record skipped: {patients}:1: a dialogue'
    assert no_dialogue in messages['patients.jsonl']
    assert 'none of the 1 dialogues went to the' in messages['one.jsonl']
    missing = refused('--corpus', FIXTURES, *common[:-4], '--tokenizer', tmp_path / 'none.model')
    assert f'no tokenizer at {tmp_path / "none.model"}: give --tokenizer=' in missing
    (tmp_path / 'noise.model').write_bytes(bytes(range(256)))
    noise = refused('--corpus', FIXTURES, *common[:-4], '--tokenizer', tmp_path / 'noise.model')
    assert f'{tmp_path / "noise.model"} is not a tokenizer.model that prepare/ wrote' in noise
    monkeypatch.chdir(tmp_path)  # no data/pretrain here: the default tokenizer is missing
    default = refused('--corpus', FIXTURES, '--out', out, '--src', src)
    assert 'no tokenizer at data/pretrain/tokenizer.model' in default and 'python -m prepare.pretrain' in default
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # whole, as it was
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith('set')) == ['set']


def test_an_out_in_a_folder_it_may_not_write_in_is_refused_before_reading(
    src, tokenizer, monkeypatch, unwritable_folder
):
    from prepare import covid

    read = []
    monkeypatch.setattr(dialogues, 'read_dialogues', lambda *args: read.append(args))
    monkeypatch.setattr(covid, 'read_covid_split', lambda *args: read.append(args))
    out = unwritable_folder / 'set'
    refusal = f'--out {out}: this process may not write in {unwritable_folder} (a read-only disk or folder)'
    assert refusal in refused('--corpus', FIXTURES, '--out', out, '--src', src, '--tokenizer', tokenizer)
    monkeypatch.setattr(sys, 'argv', ['covid', '--out', str(out), '--src', str(src)])  # a built-in example set
    with pytest.raises(SystemExit) as covid_refusal:
        exit_on_data_error(covid.main)
    assert refusal in str(covid_refusal.value.code)
    assert read == [] and not out.exists()


# ----- the hold-out and the scripts that read a set ----------------------------------------------------


def test_a_later_pretraining_build_leaves_out_the_sets_validation_and_test_dialogues(
    src,
    tokenizer,
    small_src,
    tmp_path,  # noqa: F811 (small_src is the imported fixture)
):
    mine = tmp_path / 'data' / 'mine'
    build(src, tokenizer, mine, FIXTURES / 'consultations.jsonl')
    held_out = [json.loads(line) for line in (mine / 'heldout.jsonl').read_text(encoding='utf-8').splitlines()]
    assert {line['split'] for line in held_out} == {'val', 'test'}
    test_dialogue = next(line['text'] for line in held_out if line['split'] == 'test')
    # the test dialogue as another corpus writes it (病人：/医生： labels), among unrelated notes
    turns = [piece for piece in test_dialogue.replace('<doctor>', '<patient>').split('<patient>') if piece]
    utterances = [('病人：' if k % 2 == 0 else '医生：') + turn for k, turn in enumerate(turns)]
    corpus = tmp_path / 'corpus.jsonl'
    notes = [
        json.dumps({'text': f'第{i}篇笔记：天气晴朗，气温{i}度，适合散步{i % 7}公里。'}, ensure_ascii=False)
        for i in range(80)
    ]
    corpus.write_text('\n'.join([json.dumps(utterances, ensure_ascii=False)] + notes), encoding='utf-8')
    result = subprocess.run(
        [sys.executable, '-m', 'prepare.pretrain', '--src', str(small_src), '--corpus', str(corpus)]
        + ['--out', str(tmp_path / 'data' / 'pt'), '--tokenizer', 'char', '--workers', '1'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f', {len(held_out)} of {mine} (heldout.jsonl)' in result.stdout
    meta = json.loads((tmp_path / 'data' / 'pt' / 'meta.json').read_text(encoding='utf-8'))
    assert meta['held_out_per_set']['mine'] == len(held_out)
    assert meta['documents'][str(corpus)]['held_out_mine'] == 1
    assert meta['documents'][str(corpus)]['train'] + meta['documents'][str(corpus)]['val'] == len(notes)


@pytest.fixture(scope='module')
def base_path(tokenizer, tmp_path_factory):
    """A tiny random pretrained model that reads the tokenizer's ids."""
    torch.manual_seed(0)
    model_args = dict(block_size=64, vocab_size=Tokenizer.load(str(tokenizer)).vocab_size, n_layer=1, n_head=2)
    model_args.update(n_embd=16, dropout=0.0, bias=False, n_lexical=0, n_entity=0)
    path = tmp_path_factory.mktemp('base') / 'best.pt'
    checkpoint = dict(model_args=model_args, config={}, tokenizer=tokenizer_record(str(tokenizer)))
    save_checkpoint(dict(checkpoint, model=GPT(GPTConfig(**model_args)).state_dict()), str(path))
    return path


def test_finetune_eval_and_sample_read_a_built_set_by_its_name(src, tokenizer, base_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('CMED_DATA', str(src))  # sample.py tags a prompt with the lexicon of the source folder
    corpus = FIXTURES / 'consultations.jsonl'
    build(src, tokenizer, Path('data') / 'mine', corpus, extra=('--label_field', 'department'))
    run = [f'--init_from={base_path.parent}', '--dataset=mine', '--max_iters=2', '--batch_size=2', '--warmup_iters=1']
    full = finetune.main(run + ['--out_dir=out/full', '--lexical', '--entity'])
    ptuned = finetune.main(
        run + ['--out_dir=out/pt', '--mode=ptune', '--n_prompt=2', '--generate_examples=2', '--max_new_tokens=3']
    )
    classified = finetune.main(run + ['--out_dir=out/classify', '--task=classify'])
    assert np.isfinite([full['test_ppl'], ptuned['test_ppl']]).all() and ptuned['test_generated'] == 2
    assert full['trainable_params'] == full['total_params'] > ptuned['trainable_params']
    assert 0 <= classified['test_acc'] <= 1 and 'test_loss' not in classified
    scored = evaluator.main(
        ['--out_dir=out/pt', '--dataset=mine', '--generate', '--max_examples=2', '--max_new_tokens=3']
    )
    assert scored['loss'] == pytest.approx(ptuned['test_loss']) and scored['bleu1'] == pytest.approx(
        ptuned['test_bleu1']
    )
    with pytest.raises(SystemExit, match='`python -m prepare.dialogues --corpus YOUR_DIALOGUES --out data/other`'):
        finetune.main(run + ['--out_dir=out/other', '--dataset=other'])  # a set not built: the command that builds it
    replies = sample.main(['--out_dir=out/full', '--dialogue', '--prompt=孩子咳嗽两天了', '--max_new_tokens=3'])
    assert len(replies) == 1 and '<doctor>' not in replies[0]
