"""The leakage guard: no pretraining document may contain a validation or test dialogue of a fine-tuning set.

A held-out dialogue is known by its shingles: the 20-letter windows of its letters alone (punctuation,
spaces, speaker pieces and 病人：/医生： labels dropped, because corpora re-punctuate and merge the same
utterances), taken every 10 letters. A document that contains a dialogue contains all of that dialogue's
windows, wherever the sampling started, so a document is held out when it holds at least half of some
dialogue's shingles (half, not all: a corpus may cut or re-word the opening description, as COVID's raw dump
does). Short template phrases that many dialogues share cannot reach half of any one dialogue's shingles.
"""

import re

WIDTH, STRIDE, SHARE = 20, 10, 0.5
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
