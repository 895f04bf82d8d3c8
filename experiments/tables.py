"""
The papers' tables: what each row of each table runs (table_specs), and the tables from reproduce.py's run
results: mean ± sample std over seeds per row, trainable parameters and wall time, Markdown, the notes under
a table (pretraining facts, the n-gram verdict), and the cells whose numbers are missing or not finite (CI
fails on those).

A row's run spec names its base (a pretraining run: 'medical' is data/pretrain, 'general' general news text,
'medical_equal' as many characters of medical text as 'general' has), how it starts (pretrained, or random
weights of the same size), the example set and what finetune.py does on it.
"""

import json
import math

import numpy as np

COLUMNS = {  # table kind -> (header, result key, format[, scale])
    'lm': [('test PPL', 'test_ppl', '{:.2f}'), ('bits/char', 'test_bpc', '{:.3f}')],
    'class': [('accuracy %', 'test_acc', '{:.1f}', 100), ('macro-F1 %', 'test_f1', '{:.1f}', 100)],
    'generation': [
        ('BLEU-1', 'test_bleu1', '{:.1f}'),
        ('BLEU-2', 'test_bleu2', '{:.1f}'),
        ('BLEU-4', 'test_bleu4', '{:.1f}'),
        ('Distinct-1', 'test_distinct1', '{:.3f}'),
        ('Distinct-2', 'test_distinct2', '{:.3f}'),
        ('entity F1 %', 'test_entity_f1', '{:.1f}', 100),
        ('gold entity F1 %', 'test_gold_entity_f1', '{:.1f}', 100),
        ('distinct replies %', 'test_distinct_replies', '{:.0f}', 100),
        ('top reply %', 'test_top_reply_share', '{:.0f}', 100),
    ],
}
OPTIONAL = {'test_gold_entity_f1'}  # only sets with their own entity labels have it
N_PROMPT = 25  # p-tuning rows that do not sweep the prompt length
NGRAM_ORDER = 5
# replies sampled (temperature 1, nucleus 0.9, seeded by the run's seed) with Hugging Face's two rules against
# loops (model.penalize_repeats). Greedy decoding gives many sources the model's one most likely stock reply
# (measured on the fine-tuned IMCS-21 model: 36% distinct replies among 100, the most frequent to 16%)
DECODING = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=3)
DIALOGUE_SETS = {'covid': 'COVID-DDC', 'imcs': 'IMCS-21'}
CLASS_SETS = ('department', 'dxy', 'imcs')


# ----------------------------------------------------------------------------- what each table runs


def table_specs(prompt_lengths):
    """Each table: title, what its cells measure ('lm', 'class' or 'generation'), rows of (label, run spec).
    prompt_lengths: {dataset: the prompt lengths Table 5 sweeps on it}."""

    def cell(**spec):
        return dict(dict(base='medical', init='pretrained', dataset='covid', task='dialogue', mode='full'), **spec)

    ptune = dict(mode='ptune', n_prompt=N_PROMPT)
    tables = []
    for dataset, name in DIALOGUE_SETS.items():
        rows = [
            (f"{label}, {adapted}", cell(dataset=dataset, base=base, mode=mode))
            for base, label in (
                ('general', 'general news text'),
                ('medical_equal', 'medical text, equal size'),
                ('medical', 'medical text, all of data/pretrain'),
            )
            for mode, adapted in (('none', 'no adaptation'), ('full', 'fine-tuned'))
        ]
        rows.append((f"random init, trained on {name} only", cell(dataset=dataset, init='scratch')))
        if dataset == 'covid':
            rows.append((f"character {NGRAM_ORDER}-gram Kneser-Ney, data/pretrain text", dict(ngram=NGRAM_ORDER)))
        tables.append(
            dict(title=f"Table 3: general vs medical pretraining ({name} test, doctor replies)", kind='lm', rows=rows)
        )
    tables += [
        dict(
            title='Table 4: no adaptation vs fine-tuning vs p-tuning',
            kind='lm',
            rows=[
                (f"{dataset}: {label}", cell(dataset=dataset, **spec))
                for dataset in ('covid', 'imcs', 'dxy')
                for label, spec in (
                    ('no adaptation', dict(mode='none')),
                    ('full fine-tuning', {}),
                    (f"p-tuning ({N_PROMPT} vectors)", ptune),
                )
            ],
        ),
        dict(
            title='Table 5: p-tuning, number of prompt vectors',
            kind='lm',
            rows=[
                (f"{dataset}: {n} vectors", cell(dataset=dataset, mode='ptune', n_prompt=n))
                for dataset, lengths in prompt_lengths.items()
                for n in lengths
            ],
        ),
        dict(
            title=f"Table 6: entity-aware p-tuning ({N_PROMPT} vectors)",
            kind='lm',
            rows=[
                (f"{dataset}: {label}", cell(dataset=dataset, **ptune, **extra))
                for dataset in DIALOGUE_SETS
                for label, extra in (
                    ('p-tuning', {}),
                    ('+ lexical', dict(lexical=True)),
                    ('+ entity', dict(entity=True)),
                    ('+ lexical + entity', dict(lexical=True, entity=True)),
                    ('entity splicing', dict(entity_splice=True)),
                )
            ],
        ),
        dict(
            title=f"New: entity ids from IMCS-21's gold symptom labels vs from lexicon matching (p-tuning, "
            f"{N_PROMPT} vectors, IMCS-21 test)",
            kind='lm',
            rows=[
                (f"{label}, {tags}", cell(dataset=dataset, **ptune, **extra))
                for label, extra in (
                    ('+ entity', dict(entity=True)),
                    ('+ lexical + entity', dict(lexical=True, entity=True)),
                )
                for dataset, tags in (('imcs', 'gold tags'), ('imcs_lexicon', 'lexicon tags'))
            ],
        ),
        dict(
            title='New: generated replies (sampled) scored against the references',
            kind='generation',
            rows=[
                (f"{dataset}: {label}", cell(dataset=dataset, **spec))
                for dataset in DIALOGUE_SETS
                for label, spec in (
                    ('no adaptation', dict(mode='none')),
                    ('full fine-tuning', {}),
                    (f"p-tuning ({N_PROMPT} vectors)", ptune),
                    ('p-tuning + lexical + entity', dict(ptune, lexical=True, entity=True)),
                )
            ],
        ),
        dict(
            title='MEDI-BERPT: classification, full fine-tuning (department QA; DXY disease; IMCS-21 disease)',
            kind='class',
            rows=[
                (f"{dataset}: {label}", cell(dataset=dataset, task=task))
                for dataset in CLASS_SETS
                for label, task in (
                    ('classification head alone', 'classify'),
                    ('multitask (class + 1.0 x LM)', 'multitask'),
                    ('label as text', 'label_text'),
                )
            ],
        ),
        dict(
            title=f"BioGPT: where the soft prompt goes (p-tuning, {N_PROMPT} vectors, COVID-DDC)",
            kind='lm',
            rows=[
                ('in front of the source', cell(**ptune)),
                ('between source and target', cell(**ptune, prompt_position='infix')),
            ],
        ),
    ]
    return tables


def is_deterministic(spec):
    """Runs that train nothing give the same numbers for every seed: one evaluation is all there is."""
    return 'ngram' in spec or spec['mode'] == 'none'


# ----------------------------------------------------------------------------- from results to tables


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_cell(values, fmt, scale=1):
    """'mean ± std' over seeds; a single value (an evaluation without training) alone; '—' for none."""
    if not values or any(v is None for v in values):
        return '—'
    mean, std = mean_std([v * scale for v in values])
    return fmt.format(mean) if len(values) == 1 else f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_count(n):
    if n is None:
        return '—'
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def aggregate_row(label, row_results, kind):
    """One table row from its runs' result dicts: metric cells (mean ± std), trainable parameters, mean wall time."""
    cells = [label]
    for header, key, fmt, *scale in COLUMNS[kind]:
        cells.append(format_cell([r.get(key) for r in row_results], fmt, *scale))
    # finetune.py counts the parameters that would train; a run without adaptation trains none
    trainable = {0 if r.get('mode') == 'none' else r['trainable_params'] for r in row_results}
    cells.append(format_count(trainable.pop()) if len(trainable) == 1 else '/'.join(map(format_count, trainable)))
    cells.append(f"{np.mean([r['wall_time_s'] for r in row_results]):.0f}")
    cells.append(str(len(row_results)))
    return cells


def header(kind):
    return ['run'] + [c[0] for c in COLUMNS[kind]] + ['trainable params', 'wall time s', 'seeds']


def markdown_table(header_cells, rows):
    lines = ['| ' + ' | '.join(header_cells) + ' |', '|' + '---|' * len(header_cells)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def non_finite_cells(rows_results, kind):
    """(row label, metric) of every metric value that is missing or not finite (the n-gram's PPL and the
    OPTIONAL ones aside)."""
    bad = []
    for label, row_results in rows_results:
        for _, key, *_ in COLUMNS[kind]:
            for r in row_results:
                if r.get(key) is None and ('ngram' in r or key in OPTIONAL):
                    continue
                if not (isinstance(r.get(key), (int, float)) and math.isfinite(r[key])):
                    bad.append((label, key))
    return sorted(set(bad))


def pretraining_note(bases):
    size = next(iter(bases.values()))
    facts = '; '.join(
        f"{name} (data/{p['dataset']}: {p['train_chars'] / 1e6:.2f}M training characters, val "
        f"bits/char {p['val_bpc']:.3f}, {p['wall_time_s'] or '?'} s)"
        for name, p in bases.items()
    )
    return (
        f"Pretraining: one run per corpus (seed 1337; the compute budget), each {format_count(size['params'])} "
        f"parameters and {size['iters']} iterations: {facts}. The general and the equal-size medical text share "
        f"data/pretrain's tokenizer, so that both fine-tune on the same example sets. ± is the sample std over "
        f"fine-tuning seeds (for random-init rows, over seeds of the init too); rows without ± train nothing and "
        f"give the same numbers for every seed."
    )


def ngram_verdict(rows_results):
    """Says whether the best GPT row beats the n-gram, in bits per character."""
    ngram = [r for _, rr in rows_results for r in rr if 'ngram' in r][0]
    gpt = [(np.mean([r['test_bpc'] for r in rr]), label) for label, rr in rows_results if 'ngram' not in rr[0]]
    best_bpc, best_label = min(gpt)
    verdict = 'beats' if best_bpc < ngram['test_bpc'] else 'does NOT beat'
    return (
        f"The best GPT row ({best_label}, {best_bpc:.3f} bits/char) {verdict} the n-gram "
        f"({ngram['test_bpc']:.3f}). The GPT rows also see the dialogue history before each reply; the n-gram "
        f"sees only the reply so far ({ngram['train_chars']:,} training characters, {ngram['ngrams']:,} "
        f"distinct {ngram['ngram']}-grams; test: {ngram['test_replies']} replies, {ngram['test_chars']:,} "
        f"characters, cut where the GPT's window cuts them; {ngram['seen_fraction']:.0%} of their 12-character "
        f"pieces occur verbatim in the pretraining text). PPL is per token of the GPT's tokenizer, so the "
        f"n-gram has none; bits/char compares them."
    )


def render(tables, keys_of_spec, results):
    """The Markdown of every table with its notes, and the aggregated rows for results.json."""
    parts, aggregated, bad = [], [], []
    for table in tables:
        rows_results = [
            (label, [results['runs'][k] for k in keys_of_spec[json.dumps(spec, sort_keys=True)]])
            for label, spec in table['rows']
        ]
        rows = [aggregate_row(label, rr, table['kind']) for label, rr in rows_results]
        notes = [pretraining_note(results['pretraining'])] if table is tables[0] else []
        if any('ngram' in spec for _, spec in table['rows']):
            notes.append(ngram_verdict(rows_results))
        parts.append('\n\n'.join([f"### {table['title']}", markdown_table(header(table['kind']), rows), *notes]))
        aggregated.append(dict(title=table['title'], header=header(table['kind']), rows=rows, notes=notes))
        bad += [(table['title'], *cell) for cell in non_finite_cells(rows_results, table['kind'])]
    return '\n\n'.join(parts), aggregated, bad
