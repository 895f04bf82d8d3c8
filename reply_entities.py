"""
The entities of doctor replies, for entity F1 (tasks.Dialogue.score_generated): the spans an example's entity
ids mark in its reply, the labelled dialogues whose spans give the gold vocabulary, and the lexicon the set was
tagged with (so that a generated reply's terms are found as the reference's were).
"""

import os

import numpy as np

from example_sets import entity_runs


def labelled_dialogue_examples(examples):
    """The examples of labelled dialogues. Only a dialogue's first example carries its label (prepare/dataset.py:
    one classification example per dialogue); its other examples follow it, each extending the one before."""
    kept, inside, previous = [], False, np.zeros(0, dtype=np.int64)
    for ex in examples:
        body = previous[:-1]  # the previous example without its closing <eot>
        extends = len(ex['tokens']) > len(previous) > 0 and np.array_equal(ex['tokens'][: len(body)], body)
        inside = ex['label'] >= 0 or (inside and extends)
        if inside:
            kept.append(ex)
        previous = ex['tokens']
    return kept


def reply_spans(tok, ex):
    """The entity spans of an example's reply (its target)."""
    start = int(np.argmax(ex['mask']))
    return span_texts(tok, ex['tokens'][start:], ex['entity'][start:])


def span_texts(tok, tokens, entity):
    """The text of each run of entity-tagged tokens."""
    texts = (tok.decode(list(run)).strip() for run in entity_runs(tokens, entity))
    return {text for text in texts if text and '\ufffd' not in text}  # (not a run that cuts a character)


def tagging_lexicon(meta):
    """The lexicon folder the example set was tagged with (meta.json lists its files), so that entity F1 counts
    the terms the entity ids mark; prepare/'s default folder if that one has gone."""
    from tagging import lexicon_dir

    files = [path for path in meta.get('sources', {}) if os.path.basename(os.path.dirname(path)) == 'medical_lexicon']
    folders = {os.path.dirname(path) for path in files}
    if len(folders) == 1 and all(os.path.isfile(path) for path in files):
        return folders.pop()
    return lexicon_dir()
