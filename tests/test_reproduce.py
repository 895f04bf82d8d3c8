"""Tests of reproduce.py's bookkeeping: mean ± std, cells, Markdown tables, the n-gram's reply bits, run keys
and command lines, all on hand-made result dicts (no training)."""

import math
from pathlib import Path

import pytest

from experiments import ngram_reference, reproduce, tables
from experiments.ngram import KneserNey

ROOT = Path(__file__).resolve().parents[1]


def lm_result(ppl, bpc, trainable=1000, wall=10.0, mode='full'):
    return dict(test_ppl=ppl, test_bpc=bpc, trainable_params=trainable, wall_time_s=wall, mode=mode)


def ngram_row_result(bpc):
    return dict(
        ngram=5,
        test_bpc=bpc,
        test_ppl=None,
        trainable_params=None,
        wall_time_s=3.0,
        train_chars=1000,
        ngrams=500,
        test_replies=4,
        test_chars=80,
        seen_fraction=0.25,
    )


# ----- numbers and cells -----------------------------------------------------------------------------


def test_mean_std_is_the_sample_std():
    mean, std = tables.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)  # n - 1 in the denominator: population std is 0.816
    assert tables.mean_std([5.0]) == (5.0, 0.0)


def test_format_cell():
    assert tables.format_cell([1.0, 2.0, 3.0], '{:.2f}') == '2.00 ± 1.00'
    assert tables.format_cell([0.5, 0.7], '{:.1f}', 100) == '60.0 ± 14.1'  # a fraction shown as a percentage
    assert tables.format_cell([4.25], '{:.2f}') == '4.25'  # one evaluation: no ±
    assert tables.format_cell([None], '{:.2f}') == '—'
    assert tables.format_cell([], '{:.2f}') == '—'


def test_format_count():
    assert tables.format_count(3_360_000) == '3.36M'
    assert tables.format_count(4_800) == '4.8k'
    assert tables.format_count(32) == '32'
    assert tables.format_count(None) == '—'


def test_aggregate_row():
    runs = [lm_result(10.0, 2.0, wall=10.0), lm_result(12.0, 2.2, wall=20.0), lm_result(14.0, 2.4, wall=30.0)]
    assert tables.aggregate_row('full', runs, 'lm') == ['full', '12.00 ± 2.00', '2.200 ± 0.200', '1.0k', '20', '3']


def test_aggregate_row_without_adaptation_trains_nothing():
    row = tables.aggregate_row('none', [lm_result(9.0, 1.5, trainable=5000, mode='none')], 'lm')
    assert row == ['none', '9.00', '1.500', '0', '10', '1']


def test_aggregate_classification_row_in_percent():
    runs = [
        dict(test_acc=0.8, test_f1=0.5, trainable_params=10, wall_time_s=1.0),
        dict(test_acc=0.9, test_f1=0.7, trainable_params=10, wall_time_s=3.0),
    ]
    assert tables.aggregate_row('head', runs, 'class')[1:3] == ['85.0 ± 7.1', '60.0 ± 14.1']


def test_markdown_table():
    text = tables.markdown_table(['run', 'PPL'], [['a', '1.0'], ['b', '2.0']])
    assert text.split('\n') == ['| run | PPL |', '|---|---|', '| a | 1.0 |', '| b | 2.0 |']


# ----- checks and notes ------------------------------------------------------------------------------


def test_non_finite_cells_are_found():
    rows = [
        ('ok', [lm_result(5.0, 1.0)]),
        ('nan', [lm_result(float('nan'), 1.0)]),
        ('inf', [lm_result(5.0, math.inf)]),
        ('missing', [dict(trainable_params=1, wall_time_s=1)]),
        ('n-gram', [ngram_row_result(2.0)]),
    ]  # the n-gram has no PPL, and that is fine
    assert tables.non_finite_cells(rows, 'lm') == [
        ('inf', 'test_bpc'),
        ('missing', 'test_bpc'),
        ('missing', 'test_ppl'),
        ('nan', 'test_ppl'),
    ]


def test_ngram_verdict_says_which_wins():
    rows = [('gpt', [lm_result(5.0, 1.9), lm_result(5.0, 2.1)]), ('n-gram', [ngram_row_result(2.5)])]
    assert 'beats the n-gram' in tables.ngram_verdict(rows)
    rows[1] = ('n-gram', [ngram_row_result(1.5)])
    assert 'does NOT beat the n-gram' in tables.ngram_verdict(rows)


def test_render_tables_from_results():
    specs = [dict(title='T', kind='lm', rows=[('full', dict(base='s', mode='full')), ('n-gram', dict(ngram=5))])]
    results = dict(
        runs={'a': lm_result(10.0, 2.0), 'b': lm_result(12.0, 2.2), 'g': ngram_row_result(3.0)},
        pretraining=dict(s=dict(params=1000, iters=5, val_bpc=4.0, wall_time_s=2.0, dataset='d', train_chars=650_000)),
    )
    keys_of_spec = {'{"base": "s", "mode": "full"}': ['a', 'b'], '{"ngram": 5}': ['g']}
    markdown, aggregated, bad = tables.render(specs, keys_of_spec, results)
    assert '| full | 11.00 ± 1.41 | 2.100 ± 0.141 | 1.0k | 10 | 2 |' in markdown
    assert '| n-gram | — | 3.000 | — | 3 | 1 |' in markdown
    assert 'beats the n-gram' in markdown and 'one run per corpus' in markdown
    assert 's (data/d: 0.65M training characters, val bits/char 4.000, 2.0 s)' in markdown
    assert aggregated[0]['rows'][0][0] == 'full' and bad == []


# ----- runs ------------------------------------------------------------------------------------------


def test_reply_bits_match_the_ngram_models_own_scoring():
    texts = ['发热三天，咳嗽。', '建议多喝水，注意休息。', '咳嗽有痰，发热。'] * 3
    model = KneserNey(3).fit(texts)
    reply = '发热，多喝水。'
    bpc, n_chars = model.bits_per_char([reply])  # scores the end marker too
    assert ngram_reference.reply_bits(model, reply, True) == pytest.approx(bpc * n_chars)
    without_end = ngram_reference.reply_bits(model, reply, False)  # a reply cut by the window: no end marker scored
    assert 0 < without_end < bpc * n_chars


def test_seen_fraction_counts_pieces_found_in_training_text():
    replies = [('abcdefgh', True), ('wxyz', False)]  # pieces of 4: abcd, efgh, wxyz
    assert ngram_reference.seen_fraction(replies, ['..abcd..', 'wxyz'], width=4) == pytest.approx(2 / 3)


def test_only_runs_that_train_nothing_are_deterministic():
    assert tables.is_deterministic(dict(mode='none'))
    assert tables.is_deterministic(dict(ngram=5))
    assert not tables.is_deterministic(dict(mode='ptune'))


def test_finetune_settings(tmp_path):
    cfg = reproduce.SimpleNamespace(out_dir=str(tmp_path), finetune_iters=0)
    scale = dict(finetune_iters=40, max_eval_examples=16, generate_examples=5, max_new_tokens=8)
    model_args = dict(
        block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8, dropout=0.0, bias=False, n_lexical=0, n_entity=0
    )
    pretrained = dict(dir=str(tmp_path / 'pretrain-s'), model_args=model_args, learning_rate=1e-3)
    spec = dict(base='s', init='pretrained', dataset='covid', task='dialogue', mode='full')
    settings = reproduce.finetune_settings(spec, 7, pretrained, scale, cfg)
    assert settings['mode'] == 'full' and settings['seed'] == 7 and settings['max_iters'] == 40
    assert 'base' not in settings and 'init' not in settings
    # replies are generated for dialogue cells on COVID-DDC and IMCS-21, not for splicing, DXY or classification
    assert settings['generate_examples'] == 5 and settings['max_new_tokens'] == 8
    for other in (dict(entity_splice=True), dict(dataset='dxy'), dict(task='classify')):
        assert 'generate_examples' not in reproduce.finetune_settings(dict(spec, **other), 7, pretrained, scale, cfg)
    assert settings['learning_rate'] == reproduce.FULL_FINETUNE_LR and settings['init_checkpoint'] == 'best.pt'
    scratch = reproduce.finetune_settings(dict(spec, init='scratch'), 7, pretrained, scale, cfg)
    assert scratch['learning_rate'] == 0.001  # trained from nothing: the pretraining rate
    assert (tmp_path / 'scratch-pretrain-s' / 'seed7.pt').exists()
    assert reproduce.run_key(settings, 'ab' * 32) != reproduce.run_key(scratch, 'ab' * 32)
    assert reproduce.run_key(settings, 'ab' * 32) != reproduce.run_key(settings, 'cd' * 32)


def test_run_script_writes_a_config_file_the_script_reads(tmp_path, monkeypatch):
    """A child run gets its settings as a config file; a failing run stops reproduce with its log's path."""
    monkeypatch.chdir(ROOT)
    settings = dict(init_from=str(tmp_path / 'nothing'), out_dir=str(tmp_path / 'out'), max_iters=1)
    with pytest.raises(SystemExit, match='finetune.py failed'):
        reproduce.run_script('finetune.py', settings, str(tmp_path / 'run'), 'finetune', 1)
    written = (tmp_path / 'run' / 'finetune.py').read_text(encoding='utf-8')
    assert "max_iters = 1\n" in written and f"out_dir = {str(tmp_path / 'out')!r}\n" in written
    assert 'max_iters' in (tmp_path / 'run' / 'finetune.log').read_text(encoding='utf-8')  # the child printed it


def test_table_specs_cover_the_papers_tables():
    specs = tables.table_specs({'covid': (1, 25, 100), 'imcs': (1, 25)})
    assert len(specs) == 9 and len({table['title'] for table in specs}) == 9
    for table in specs:
        labels = [label for label, _ in table['rows']]
        assert len(labels) == len(set(labels)), table['title']
    covid3, imcs3 = specs[0], specs[1]
    # general vs equal-size medical vs all medical, each without and with fine-tuning; random init; the n-gram
    assert [(s.get('base'), s.get('mode')) for _, s in covid3['rows'][:6]] == [
        (b, m) for b in ('general', 'medical_equal', 'medical') for m in ('none', 'full')
    ]
    assert covid3['rows'][6][1]['init'] == 'scratch' and covid3['rows'][-1][1] == dict(ngram=tables.NGRAM_ORDER)
    assert {s['dataset'] for _, s in covid3['rows'][:-1]} == {'covid'}
    assert {s['dataset'] for _, s in imcs3['rows']} == {'imcs'}
    assert len(imcs3['rows']) == 7  # no n-gram row: it is trained and scored on COVID text
    table5 = next(t for t in specs if t['title'].startswith('Table 5'))
    assert [(s['dataset'], s['n_prompt']) for _, s in table5['rows']] == [
        ('covid', 1),
        ('covid', 25),
        ('covid', 100),
        ('imcs', 1),
        ('imcs', 25),
    ]
    gold_vs_lexicon = next(t for t in specs if 'gold' in t['title'])
    pairs = [spec for _, spec in gold_vs_lexicon['rows']]
    assert [s['dataset'] for s in pairs] == ['imcs', 'imcs_lexicon'] * 2
    assert all(dict(a, dataset=None) == dict(b, dataset=None) and a['entity'] for a, b in zip(pairs[::2], pairs[1::2]))
    # every generation row is a cell of Table 4 or 6: its replies come from runs those tables make anyway
    generation = next(t for t in specs if t['kind'] == 'generation')
    elsewhere = [spec for t in specs if t['title'].startswith(('Table 4', 'Table 6')) for _, spec in t['rows']]
    assert len(generation['rows']) == 8 and all(spec in elsewhere for _, spec in generation['rows'])
    classification = next(t for t in specs if t['kind'] == 'class')
    assert [(s['dataset'], s['task']) for _, s in classification['rows']] == [
        (d, t) for d in ('department', 'dxy', 'imcs') for t in ('classify', 'multitask', 'label_text')
    ]


def test_gold_entity_f1_may_be_missing_but_nothing_else():
    scores = dict(
        test_bleu1=10.0,
        test_bleu2=5.0,
        test_bleu4=1.0,
        test_distinct1=0.5,
        test_distinct2=0.7,
        test_entity_f1=0.2,
        test_distinct_replies=0.9,
        test_top_reply_share=0.04,
        trainable_params=1,
        wall_time_s=1.0,
    )
    rows = [
        ('covid', [scores]),
        ('imcs', [dict(scores, test_gold_entity_f1=0.3)]),
        ('broken', [dict(scores, test_bleu4=None, test_gold_entity_f1=float('nan'))]),
    ]
    assert tables.non_finite_cells(rows, 'generation') == [('broken', 'test_bleu4'), ('broken', 'test_gold_entity_f1')]
    assert tables.aggregate_row('covid', [scores], 'generation')[1:10] == [
        '10.0',
        '5.0',
        '1.0',
        '0.500',
        '0.700',
        '20.0',
        '—',
        '90',
        '4',
    ]


def test_tables_option_runs_only_the_chosen_kinds(tmp_path, monkeypatch):
    """--tables=generation hands only the generation table to the runs; an unknown kind is refused."""
    with pytest.raises(SystemExit, match='unknown kind'):
        reproduce.main(['--quick', f'--out_dir={tmp_path}', '--tables=generation,speed'])
    started = []

    def fake_run_all(chosen, seeds, scale, cfg, results, pool):
        started.append([table['kind'] for table in chosen])
        raise SystemExit('stop')

    monkeypatch.setattr(reproduce, 'run_all', fake_run_all)
    with pytest.raises(SystemExit, match='stop'):
        reproduce.main(['--quick', f'--out_dir={tmp_path}', '--tables=generation'])
    assert started == [['generation']]
