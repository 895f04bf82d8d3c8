"""The streaming pretraining build (prepare/stream.py, prepare/heldout.py, prepare/pretrain.py): the same bytes
for any worker count and chunk size, duplicates and held-out dialogues dropped and counted, a split that a new
source cannot reshuffle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare import readers  # noqa: E402
from prepare.heldout import HeldOut  # noqa: E402
from prepare.sources import Skipped  # noqa: E402
from prepare.stream import read_spool, spool, tokenizer_sample  # noqa: E402
from prepare.text import dialogue_text  # noqa: E402
from test_prepare import DATA, small_src  # noqa: E402,F401 (small_src is a fixture)

OUTPUTS = ('train.bin', 'train.lex.bin', 'train.ent.bin', 'val.bin', 'val.lex.bin', 'val.ent.bin', 'tokenizer.model')


def build(src, out, *args):
    result = subprocess.run(
        [sys.executable, '-m', 'prepare.pretrain', '--src', str(src), '--out', str(out), '--tokenizer', 'char', *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / 'meta.json').read_text(encoding='utf-8'))


def test_the_same_bytes_for_any_worker_count_and_chunk_size(small_src, tmp_path):
    one = build(small_src, tmp_path / 'one', '--workers', '1', '--chunk_docs', '100000')
    many = build(small_src, tmp_path / 'many', '--workers', '2', '--chunk_docs', '3')  # many chunks, two processes
    for name in OUTPUTS:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'many' / name).read_bytes(), name
    assert one['splits'] == many['splits'] and one['splits']['train']['records'] > 3 * 10
    assert not (tmp_path / 'one' / 'documents.spool.jsonl').exists()  # the spool is gone once the build is done


def documents(texts, source='s'):
    return [(source, text, (), None) for text in texts]


def test_spool_drops_duplicates_and_held_out_dialogues_and_counts_them(tmp_path):
    held_out = HeldOut()
    test_dialogue = (
        '<patient>孩子发烧三天了，体温三十九度，咳嗽有痰，精神不太好。'
        '<doctor>有没有气喘？血常规查了吗？建议先去医院查血常规和胸片。'
    )
    held_out.add(test_dialogue, 'covid')
    # the same dialogue re-punctuated and inside a longer consultation: held out
    leaked = (
        '病人：孩子发烧三天了 体温三十九度 咳嗽有痰 精神不太好\n'
        '医生：有没有气喘 血常规查了吗 建议先去医院查血常规和胸片 多喝水'
    )
    headache = '头痛两周了，晚上睡不好，血压正常。'
    texts = [headache, '腹泻两天，一天五六次，稀水样。', headache, leaked]
    counts, n, train_chars = spool(documents(texts), str(tmp_path / 'spool'), held_out, 0.0)
    assert counts == {'s': {'read': 4, 'train': 2, 'duplicates': 1, 'held_out_covid': 1}} and n == 2
    assert [job[0] for _, job in read_spool(str(tmp_path / 'spool'))] == texts[:2]
    assert train_chars == len(texts[0]) + len(texts[1])
    assert tokenizer_sample(str(tmp_path / 'spool'), train_chars, 1000, 0) == texts[:2]  # under budget: all lines


def test_a_new_source_does_not_move_documents_between_splits(tmp_path):
    texts = [f'第{i}位病人：咳嗽{i}天，发热。' for i in range(400)]
    extra = [f'另一个来源的文本{i}：腹痛。' for i in range(200)]
    first, _, _ = spool(documents(texts), str(tmp_path / 'a'), HeldOut(), 0.05)
    spool(documents(extra, 'new') + documents(texts), str(tmp_path / 'b'), HeldOut(), 0.05)
    split_a = {job[0]: split for split, job in read_spool(str(tmp_path / 'a'))}
    split_b = {job[0]: split for split, job in read_spool(str(tmp_path / 'b'))}
    assert all(split_b[text] == split for text, split in split_a.items())
    assert 5 <= first['s']['val'] <= 40  # about 5% of 400


def test_the_tokenizer_sample_is_bounded_and_seeded(tmp_path):
    texts = [f'第{i:04d}行文本' for i in range(1000)]  # 9 characters each
    _, _, train_chars = spool(documents(texts), str(tmp_path / 'spool'), HeldOut(), 0.0)
    a, b, c = (tokenizer_sample(str(tmp_path / 'spool'), train_chars, 900, seed) for seed in (7, 7, 8))
    assert 60 <= len(a) <= 140 and a == b and a != c and set(a) <= set(texts)  # about 900 characters of 9,000


def test_every_covid_test_dialogue_is_held_out_and_unrelated_text_is_not():
    held_out = HeldOut()
    test_dialogues = readers.read_covid_split(str(DATA / readers.COVID_SPLIT_FILES['test']), Skipped())
    for turns in test_dialogues:
        held_out.add(dialogue_text(turns), 'covid')
    assert all(held_out.holds(dialogue_text(turns)) == 'covid' for turns in test_dialogues)
    book = (DATA / 'medical_book' / 'fever.txt').read_text(encoding='utf-8')
    assert all(held_out.holds(book[i : i + 2000]) is None for i in range(0, len(book) - 2000, 20000))


def test_gold_entity_ids_replace_lexicon_matching():
    import tempfile

    from tagging import Tagger, lexicon_dir
    from tokenizer import train_char

    with tempfile.TemporaryDirectory() as folder:
        tok = train_char(['孩子发烧咳嗽'], os.path.join(folder, 'tok'), vocab_size=300)
        tagger = Tagger(lexicon_dir(str(DATA)))
        text = '孩子发烧咳嗽'
        _, _, lexicon_tags = tagger.encode(tok, text)
        gold = np.array([0, 0, 1, 1, 0, 0], dtype=np.uint8)  # only 发烧, as if annotated so
        _, _, gold_tags = tagger.encode(tok, text, (), gold)
        assert lexicon_tags.tolist() != gold_tags.tolist() and gold_tags.tolist() == gold.tolist()


def test_thinning_keeps_an_even_sample_of_the_training_text(tmp_path):
    from prepare.stream import thin_spool

    texts = [f"第{i}篇：发热咳嗽，多喝水。" * (1 + i % 5) for i in range(400)]
    _, n, train_chars = spool(documents(texts), str(tmp_path / 'spool'), HeldOut(), 0.1)
    n_val = sum(split == 'val' for split, _ in read_spool(str(tmp_path / 'spool')))
    kept, kept_chars = thin_spool(str(tmp_path / 'spool'), train_chars, train_chars // 3)
    after = list(read_spool(str(tmp_path / 'spool')))
    assert len(after) == kept and sum(split == 'val' for split, _ in after) == n_val  # validation all stays
    assert kept_chars == sum(len(job[0]) for split, job in after if split == 'train')
    assert 0.25 < kept_chars / train_chars < 0.42  # about a third, chosen by hash: no source favoured
    assert [job[0] for _, job in after] == [t for t in texts if t in {job[0] for _, job in after}]  # order kept
    spool(documents(texts), str(tmp_path / 'again'), HeldOut(), 0.1)
    assert thin_spool(str(tmp_path / 'again'), train_chars, train_chars // 3) == (kept, kept_chars)  # deterministic
    assert thin_spool(str(tmp_path / 'again'), kept_chars, 10**9) == (kept, kept_chars)  # more than there is: all


def test_a_set_built_with_another_sets_tokenizer_and_a_character_budget(small_src, tmp_path):
    full = build(small_src, tmp_path / 'full')
    small = build(
        small_src,
        tmp_path / 'small',
        '--tokenizer',
        str(tmp_path / 'full' / 'tokenizer.model'),
        '--train_chars',
        str(full['splits']['train']['input_chars'] // 2),
    )
    assert (tmp_path / 'small' / 'tokenizer.model').read_bytes() == (tmp_path / 'full' / 'tokenizer.model').read_bytes()
    assert 0.35 < small['splits']['train']['input_chars'] / full['splits']['train']['input_chars'] < 0.65
    assert small['splits']['val'] == full['splits']['val'] and small['train_chars_wanted'] > 0
    missing = subprocess.run(
        [
            sys.executable,
            '-m',
            'prepare.pretrain',
            '--src',
            str(small_src),
            '--out',
            str(tmp_path / 'none'),
            '--tokenizer',
            str(tmp_path / 'nowhere' / 'tokenizer.model'),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and 'Traceback' not in missing.stderr and 'nowhere' in missing.stderr
    assert not (tmp_path / 'none').exists()
