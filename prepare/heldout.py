"""The leakage guard: no pretraining document may contain a validation or test dialogue of a fine-tuning set.

A held-out dialogue is known by its shingles: the 20-letter windows of its letters alone (punctuation,
spaces, speaker pieces and 病人：/医生： labels dropped, because corpora re-punctuate and merge the same
utterances), taken every 10 letters. A document that contains a dialogue contains all of that dialogue's
windows, wherever the sampling started, so a document is held out when it holds at least half of some
dialogue's shingles (half, not all: a corpus may cut or re-word the opening description, as COVID's raw dump
does). Short template phrases that many dialogues share cannot reach half of any one dialogue's shingles.

The built-in sets' held-out dialogues are read from their sources (prepare/pretrain.py); an example set built from
any corpus (prepare/dialogues.py) writes its own to heldout.jsonl in its folder, and every pretraining build adds
those of each set beside its --out and under data/ (example_sets_held_out).
"""

import json
import os
import re

from prepare.sources import DataError

WIDTH, STRIDE, SHARE = 20, 10, 0.5
HELD_OUT_FILE = 'heldout.jsonl'  # in an example set's folder: one {"split", "text"} line per val/test dialogue
_NOT_LETTER = re.compile(r'[\W_]+')
_SPEAKER = re.compile(r'<patient>|<doctor>|<sep>|(?:病人|患者|医生)[:：]')  # speaker pieces and written labels


def letters(text):
    return _NOT_LETTER.sub('', _SPEAKER.sub('', text))


class HeldOut:
    def __init__(self):
        self.owner = {}  # shingle -> index of the (first) held-out dialogue it came from
        self.n_shingles = []  # per held-out dialogue
        self.names = []  # which set each came from, for the report

    def add(self, text, name):
        """One held-out dialogue (its text, in any form: speaker pieces and punctuation are ignored)."""
        content = letters(text)
        shingles = {content[i : i + WIDTH] for i in range(0, max(len(content) - WIDTH + 1, 1), STRIDE)}
        index = len(self.n_shingles)
        for shingle in shingles:
            self.owner.setdefault(shingle, index)
        self.n_shingles.append(len(shingles))
        self.names.append(name)

    def holds(self, text):
        """The name of the held-out set whose dialogue `text` contains, else None."""
        content = letters(text)
        hits = {}
        for shingle in {content[i : i + WIDTH] for i in range(max(len(content) - WIDTH + 1, 1))}:
            index = self.owner.get(shingle)
            if index is not None:
                hits[index] = hits.get(index, 0) + 1
        for index, count in hits.items():
            if count >= SHARE * self.n_shingles[index]:
                return self.names[index]
        return None

    def __len__(self):
        return len(self.n_shingles)


def example_sets_held_out(held_out, parents, exclude):
    """Add to held_out the dialogues of HELD_OUT_FILE of every example set in the folders `parents` (each a folder
    of sets, like data/), except the folder `exclude` (the build's own --out) and half-built ones (.tmp, .old).
    Returns {set folder: dialogues added}."""
    added, seen = {}, {os.path.realpath(exclude)}
    for parent in parents:
        for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
            folder, path = os.path.join(parent, name), os.path.join(parent, name, HELD_OUT_FILE)
            if name.endswith(('.tmp', '.old')) or os.path.realpath(folder) in seen or not os.path.isfile(path):
                continue
            seen.add(os.path.realpath(folder))
            added[folder] = 0
            with open(path, encoding='utf-8') as f:
                for line_no, line in enumerate(f, start=1):
                    try:
                        held_out.add(json.loads(line)['text'], name)
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(
                            f'{path}:{line_no}: not a held-out dialogue ({e}): rebuild {folder} with '
                            f'`python -m prepare.dialogues`, or delete it'
                        ) from None
                    added[folder] += 1
    return added
