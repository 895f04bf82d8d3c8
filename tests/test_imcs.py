"""IMCS-21 (prepare/readers.py, prepare/imcs.py): its gold symptom tags reach the tokens, val and test hold
labelled dialogues only, and no IMCS val/test dialogue can enter the pretraining text."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare import readers  # noqa: E402
from prepare.sources import Skipped  # noqa: E402
from prepare.text import dialogue_text  # noqa: E402
from tagging import Tagger, lexicon_dir  # noqa: E402
from test_prepare import DATA  # noqa: E402
from tokenizer import train_char  # noqa: E402


def test_gold_tags_reach_the_tokens(tmp_path):
    [first] = [r for r in readers.read_imcs(str(DATA / readers.IMCS_LABELLED), Skipped()) if r['id'] == '10355967']
    text = dialogue_text(first['turns'])
    assert len(first['entity_chars']) == len(text)
    # sentence 13 of the dialogue, by hand: 医生 "嗯啊，宝贝主要是呕吐对吗", BIO "O O O O O O O O B I O O"
    sentence = '<doctor>嗯啊,宝贝主要是呕吐对吗'  # (the full-width comma normalised)
    start = text.index(sentence) + len('<doctor>')
    assert first['entity_chars'][start : start + 12].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    # and the patient's "有一点拉肚子" (O O O B I I) right after it
    start = text.index('<patient>有一点拉肚子') + len('<patient>')
    assert first['entity_chars'][start : start + 6].tolist() == [0, 0, 0, 1, 1, 1]
    # through the tagger (one token per character here): those ids and nothing from the lexicon
    tok = train_char([text.replace('<patient>', '').replace('<doctor>', '')], str(tmp_path / 'tok'), vocab_size=2000)
    ids, _, entity = Tagger(lexicon_dir(str(DATA))).encode(tok, text, (), first['entity_chars'])
    words = [tok.decode([i]) for i, e in zip(ids.tolist(), entity.tolist()) if e]
    assert ''.join(words).startswith('呕吐拉肚子呕吐')
    lexicon_only = readers.read_imcs(str(DATA / readers.IMCS_LABELLED), Skipped(), gold=False)
    assert all(r['entity_chars'] is None for r in lexicon_only)


def test_val_and_test_hold_labelled_dialogues_only():
    splits, diseases, _ = readers.imcs_splits(str(DATA), Skipped())
    assert diseases == ['上呼吸道感染', '小儿支气管炎', '小儿消化不良', '小儿腹泻']
    assert {split: len(records) for split, records in splits.items()} == {'train': 143 + 408, 'val': 30, 'test': 30}
    assert all(r['label'] >= 0 for split in ('val', 'test') for r in splits[split])
    assert sum(r['label'] == -1 for r in splits['train']) == 408  # the unlabelled ones: generation only
    held = {r['id'] for split in ('val', 'test') for r in splits[split]}
    assert not held & {r['id'] for r in splits['train']}


def test_imcs_val_and_test_never_enter_the_pretraining_text():
    from prepare.pretrain import held_out_dialogues

    held_out = held_out_dialogues(str(DATA), Skipped())
    splits, _, _ = readers.imcs_splits(str(DATA), Skipped())
    for record in splits['test'][:5]:
        assert held_out.holds('病人：' + dialogue_text(record['turns'])) == 'imcs'
    assert np.mean([held_out.holds(dialogue_text(r['turns'])) is None for r in splits['train'][:40]]) > 0.9


def test_the_built_set_says_where_its_entity_ids_come_from_and_replies_are_scored_on_gold_spans(tmp_path):
    import subprocess

    import torch

    import eval as evaluator
    from checkpoint import save_checkpoint, tokenizer_record
    from model import GPT, GPTConfig
    from reply_entities import span_texts

    records = readers.read_imcs(str(DATA / readers.IMCS_LABELLED), Skipped())
    tok = train_char([dialogue_text(r['turns']) for r in records], str(tmp_path / 'tok'), vocab_size=3000)
    for name, extra in (('gold', []), ('lexicon', ['--lexicon_entities'])):
        built = subprocess.run(
            [
                sys.executable,
                '-m',
                'prepare.imcs',
                '--src',
                str(DATA),
                '--tokenizer_model',
                str(tmp_path / 'tok'),
                '--out',
                str(tmp_path / name),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr[-2000:]
        assert json.loads((tmp_path / name / 'meta.json').read_text(encoding='utf-8'))['entity_source'] == name
    # the gold spans of a reply, by hand: token runs tagged as entities, decoded
    ids = np.array(tok.encode('宝贝主要是呕吐,有一点拉肚子'))
    entity = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1])
    assert span_texts(tok, ids, entity) == {'呕吐', '拉肚子'}
    # a (random) model's greedy replies: gold entity scores on the gold set only
    torch.manual_seed(0)
    model_args = dict(
        block_size=64,
        vocab_size=tok.vocab_size,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        bias=False,
        n_lexical=0,
        n_entity=0,
    )
    save_checkpoint(
        dict(
            model=GPT(GPTConfig(**model_args)).state_dict(),
            model_args=model_args,
            config={},
            tokenizer=tokenizer_record(str(tmp_path / 'tok')),
        ),
        str(tmp_path / 'best.pt'),
    )
    args = [f'--checkpoint={tmp_path / "best.pt"}', '--generate', '--max_examples=4', '--max_new_tokens=8']
    gold = evaluator.main(args + [f'--dataset={tmp_path / "gold"}'])
    assert all(0 <= gold[f'gold_entity_{k}'] <= 1 for k in ('precision', 'recall', 'f1'))
    assert 'gold_entity_f1' not in evaluator.main(args + [f'--dataset={tmp_path / "lexicon"}'])


def test_terms_are_found_longest_first():
    from metrics import terms_in

    terms = {'发热', '发热三天', '咳嗽', '咳'}
    assert terms_in('孩子发热三天,咳嗽,又发热', terms, 4) == {'发热三天', '咳嗽', '发热'}
    assert terms_in('', terms, 4) == set() and terms_in('咳', terms, 4) == {'咳'}


def test_the_examples_of_labelled_dialogues_are_told_apart():
    from reply_entities import labelled_dialogue_examples

    def example(tokens, label=-1):
        return dict(tokens=np.array(tokens), label=label)

    examples = [
        example([1, 2, 9], 0),
        example([1, 2, 3, 4, 9]),
        example([1, 2, 3, 4, 5, 9]),  # labelled, 3 turns
        example([7, 8, 9]),
        example([7, 8, 6, 9]),  # unlabelled
        example([1, 5, 9], 2),
        example([1, 5, 6, 9]),  # labelled
        example([1, 5, 6, 9]),
    ]  # the same length again: a new (unlabelled) dialogue, not a continuation
    kept = labelled_dialogue_examples(examples)
    assert [ex['tokens'].tolist() for ex in kept] == [
        [1, 2, 9],
        [1, 2, 3, 4, 9],
        [1, 2, 3, 4, 5, 9],
        [1, 5, 9],
        [1, 5, 6, 9],
    ]
