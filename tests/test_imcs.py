"""prepare/imcs.py: IMCS-21's gold symptom tags reach the tokens, val and test hold labelled dialogues only,
and no IMCS val/test dialogue can enter the pretraining text."""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare import imcs  # noqa: E402
from prepare.lexicon import lexicon_dir  # noqa: E402
from prepare.sources import Skipped  # noqa: E402
from prepare.tagging import Tagger  # noqa: E402
from prepare.text import dialogue_text  # noqa: E402
from prepare.tokenizer import train_char  # noqa: E402
from test_prepare import DATA  # noqa: E402


def test_gold_tags_reach_the_tokens(tmp_path):
    [first] = [r for r in imcs.read_imcs(str(DATA / imcs.LABELLED), Skipped()) if r['id'] == '10355967']
    text = dialogue_text(first['turns'])
    assert len(first['entity_chars']) == len(text)
    # sentence 13 of the dialogue, by hand: 医生 "嗯啊，宝贝主要是呕吐对吗", BIO "O O O O O O O O B I O O"
    sentence = '<doctor>嗯啊,宝贝主要是呕吐对吗'  # (the full-width comma normalised)
    start = text.index(sentence) + len('<doctor>')
    assert first['entity_chars'][start:start + 12].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    # and the patient's "有一点拉肚子" (O O O B I I) right after it
    start = text.index('<patient>有一点拉肚子') + len('<patient>')
    assert first['entity_chars'][start:start + 6].tolist() == [0, 0, 0, 1, 1, 1]
    # through the tagger (one token per character here): those ids and nothing from the lexicon
    tok = train_char([text.replace('<patient>', '').replace('<doctor>', '')], str(tmp_path / 'tok'), vocab_size=2000)
    ids, _, entity = Tagger(lexicon_dir(str(DATA))).encode(tok, text, (), first['entity_chars'])
    words = [tok.decode([i]) for i, e in zip(ids.tolist(), entity.tolist()) if e]
    assert ''.join(words).startswith('呕吐拉肚子呕吐')
    lexicon_only = imcs.read_imcs(str(DATA / imcs.LABELLED), Skipped(), gold=False)
    assert all(r['entity_chars'] is None for r in lexicon_only)


def test_val_and_test_hold_labelled_dialogues_only():
    splits, diseases, _ = imcs.imcs_splits(str(DATA), Skipped())
    assert diseases == ['上呼吸道感染', '小儿支气管炎', '小儿消化不良', '小儿腹泻']
    assert {split: len(records) for split, records in splits.items()} == {'train': 143 + 408, 'val': 30, 'test': 30}
    assert all(r['label'] >= 0 for split in ('val', 'test') for r in splits[split])
    assert sum(r['label'] == -1 for r in splits['train']) == 408  # the unlabelled ones: generation only
    held = {r['id'] for split in ('val', 'test') for r in splits[split]}
    assert not held & {r['id'] for r in splits['train']}


def test_imcs_val_and_test_never_enter_the_pretraining_text():
    from prepare.pretrain import held_out_dialogues
    held_out = held_out_dialogues(str(DATA), Skipped())
    splits, _, _ = imcs.imcs_splits(str(DATA), Skipped())
    for record in splits['test'][:5]:
        assert held_out.holds('病人：' + dialogue_text(record['turns'])) == 'imcs'
    assert np.mean([held_out.holds(dialogue_text(r['turns'])) is None for r in splits['train'][:40]]) > 0.9
