"""experiments/time_to_quality.py's arithmetic: when a curve reaches a target, and the table it prints."""

import math

from experiments.time_to_quality import RECIPES, recipe_dataset, report, time_to


def test_time_to_interpolates_between_evaluations():
    curve = [(0, 0, 7.0), (100, 1000, 5.0), (200, 2000, 4.0), (300, 3000, 3.5)]
    assert time_to(curve, 7.0) == 0  # reached at the first point
    assert time_to(curve, 4.5) == 150  # halfway from 5.0 (100 s) to 4.0 (200 s)
    assert time_to(curve, 3.5) == 300
    assert time_to(curve, 3.4) is None  # never reached
    # between the last point above and the first at or below: a curve that went up first is no shortcut
    assert math.isclose(time_to([(10, 0, 5.0), (20, 0, 6.0), (30, 0, 3.0)], 4.0), 20 + 10 * (6 - 4) / 3)


def test_report_speedup_at_the_reference_quality(capsys):
    curves = {
        'reference': [(0, 0, 7.0), (300, 0, 5.0), (600, 0, 4.0)],
        'faster': [(0, 0, 7.0), (100, 0, 5.0), (200, 0, 4.0), (600, 0, 3.0)],
    }
    report(curves, target=3.5, ngram=3.5, ngram_order=7)
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert lines['reference'][1] == '-' and lines['reference'][-1] == '1.00x'
    # the faster recipe reaches the reference's final 4.0 at 200 s: 3x; the 3.5 target at 400 s
    assert lines['faster'][1:3] == ['400', 's'] and lines['faster'][-1] == '3.00x'


def test_only_recipes_on_data_pretrains_tokenizer_are_scored_on_covid():
    """COVID-DDC's ids are data/pretrain's: a recipe with another vocabulary cannot be scored on them."""
    datasets = {name: recipe_dataset(overrides) for name, overrides in RECIPES.items()}
    assert datasets['tiny'] == datasets['reference'] == datasets['muon+6x256'] == 'pretrain'
    assert datasets['muon+bpe4000'] == 'pretrain_v4000' and datasets['muon+chars'] == 'pretrain_char'
    assert recipe_dataset(['--dataset=pretrain', '--dataset=general']) == 'general'  # the last one wins
