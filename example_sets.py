"""
Example sets as prepare/ writes them (covid, imcs, dxy, department), and what a task (tasks.py) does to one example
before it becomes a model input. Per split, an example set stores the tokens of every example with its lexical and
entity ids, a loss mask that is 1 on the target (the doctor's reply + <eot>) and an optional label, -1 when it has
none (<split>.bin, .lex.bin, .ent.bin, .mask.bin, .offsets.npy, .labels.npy).
"""

import os

import numpy as np


def load_split(data_dir, split):
    """One split of an example set as a list of dicts of numpy arrays (source + target + eot)."""

    def read(suffix, dtype):
        return np.fromfile(os.path.join(data_dir, f"{split}.{suffix}"), dtype=dtype)

    tokens, lexical, entity = read('bin', np.uint16), read('lex.bin', np.uint8), read('ent.bin', np.uint8)
    mask = read('mask.bin', np.uint8)
    offsets = np.load(os.path.join(data_dir, f"{split}.offsets.npy"))
    labels = np.load(os.path.join(data_dir, f"{split}.labels.npy"))
    examples = []
    for i, label in enumerate(labels):
        part = slice(offsets[i], offsets[i + 1])
        examples.append(
            dict(
                tokens=tokens[part].astype(np.int64),
                lexical=lexical[part].astype(np.int64),
                entity=entity[part].astype(np.int64),
                mask=mask[part],
                label=int(label),
            )
        )
    return examples


def entity_runs(tokens, entity):
    """The distinct runs of consecutive entity-tagged tokens, in order of appearance."""
    runs, current = [], []
    for token, tag in zip(tokens.tolist(), entity.tolist()):
        if tag:
            current.append(token)
        elif current:
            runs.append(tuple(current))
            current = []
    if current:
        runs.append(tuple(current))
    return list(dict.fromkeys(runs))


def splice_entities(ex, target_start, sep_id):
    """Entity splicing (the paper's baseline): the source's entity words, each after a separator,
    go in as plain text just before the source's last token (the doctor's speaker piece)."""
    runs = entity_runs(ex['tokens'][:target_start], ex['entity'][:target_start])
    if not runs:
        return ex
    extra = np.array([t for run in runs for t in (sep_id,) + run], dtype=np.int64)
    extra_entity = np.array([t for run in runs for t in (0,) + (1,) * len(run)], dtype=np.int64)
    cut = target_start - 1

    def insert(array, values):
        return np.concatenate([array[:cut], values.astype(array.dtype), array[cut:]])

    return dict(
        ex,
        tokens=insert(ex['tokens'], extra),
        lexical=insert(ex['lexical'], np.zeros_like(extra)),
        entity=insert(ex['entity'], extra_entity),
        mask=insert(ex['mask'], np.zeros_like(extra)),
    )


def with_label_target(ex, target_start, label_ids, eot_id):
    """BioGPT's text-as-label: the target becomes the label's sentence."""
    target = np.array(label_ids + [eot_id], dtype=np.int64)
    keep = slice(0, target_start)
    return dict(
        ex,
        tokens=np.concatenate([ex['tokens'][keep], target]),
        lexical=np.concatenate([ex['lexical'][keep], np.zeros_like(target)]),
        entity=np.concatenate([ex['entity'][keep], np.zeros_like(target)]),
        mask=np.concatenate([ex['mask'][keep], np.ones(len(target), dtype=np.uint8)]),
    )


def crop_window(length, target_start, room):
    """[start, end) of at most room tokens, cropping the source from the left; if the target alone
    does not fit, the source keeps half the window and the target is cut at the end."""
    if length <= room:
        return 0, length
    source_keep = min(target_start, max(room - (length - target_start), room // 2))
    start = target_start - source_keep
    return start, start + room
