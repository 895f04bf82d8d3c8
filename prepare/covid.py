"""COVID-DDC (covid_dialog_zh/): the raw dump for pretraining, the official 870/109/109 split for fine-tuning.

    python prepare/covid.py [--src DIR]    ->  data/covid/ (needs data/pretrain/tokenizer.model)

Examples: one per doctor turn of each split dialogue (source = the dialogue so far, target = the doctor's
utterance); no labels. The raw dump's consultations that are validation/test dialogues are removed from the
pretraining text (pretraining_consultations), so test perplexity is measured on unseen dialogues.
"""
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python prepare/covid.py`

from prepare.dataset import arg_parser, build_example_set, exit_on_data_error
from prepare.sources import DataError, Skipped, read_text, source_file
from prepare.corpus import SPEAKERS, meddialog_blocks, meddialog_turns
from prepare.text import clean, dialogue_text

RAW = 'covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt'
SPLIT_FILES = {'train': 'covid_dialog_zh/train_data.json', 'val': 'covid_dialog_zh/validate_data.json',
               'test': 'covid_dialog_zh/test_data.json'}
def read_raw(path, skipped):
    """Consultations of the raw dump: [dict(line, turns=[(speaker, text)], description, dialogue)], the last two
    being the letters of the description and of the dialogue alone (to match the split files against)."""
    consultations = []
    for line_no, block in meddialog_blocks(enumerate(read_text(path).split('\n'), start=1)):
        turns = meddialog_turns(block)
        if not re.fullmatch(r'id=\d+', block[0].strip()):
            skipped.add(path, line_no, 'consultation does not start with "id=N"')
        elif not turns:
            skipped.add(path, line_no, 'consultation without any text')
        else:
            consultations.append({'line': line_no, 'turns': [(speaker, text) for speaker, text, _ in turns],
                                  'description': _content(text for _, text, section in turns if section == 'Description'),
                                  'dialogue': _content(text for _, text, section in turns if section == 'Dialogue')})
    return consultations


def _content(texts):
    """Letters, digits and CJK only: the split files merge and re-punctuate the raw utterances."""
    return re.sub(r'\W', '', ''.join(texts))


def read_split(path, skipped):
    """Dialogues of an official split file: [[(speaker, text)]]; utterances are prefixed '病人：' / '医生：'."""
    try:
        dialogues = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
    out = []
    for n, dialogue in enumerate(dialogues, start=1):
        turns = _split_turns(dialogue)
        if turns is None:
            skipped.add(path, f'record {n}', 'not a list of "病人：…" / "医生：…" utterances')
        else:
            out.append(turns)
    return out


def _split_turns(dialogue):
    if not isinstance(dialogue, list) or not dialogue:
        return None
    turns = []
    for utterance in dialogue:
        if not isinstance(utterance, str) or utterance[:2] not in SPEAKERS or utterance[2:3] not in '：:':
            return None
        if clean(utterance[3:]):
            turns.append((SPEAKERS[utterance[:2]], clean(utterance[3:])))
    return turns if any(speaker == 'doctor' for speaker, _ in turns) else None


def pretraining_consultations(src, skipped):
    """Raw consultations minus exact duplicates and minus those holding a validation/test dialogue.
    Returns (dialogues [[(speaker, text)]], report dict, source paths)."""
    raw_path = source_file(RAW, src)
    held_out_paths = [source_file(SPLIT_FILES[split], src) for split in ('val', 'test')]
    # a split dialogue opens with the patient's description (a field of the raw description, sometimes cut or
    # re-worded), then the dialogue, merged and re-punctuated. A consultation is held out when it has the same
    # description (first 20 letters: a follow-up consultation repeats it), or the same dialogue and a
    # description starting alike (the dialogue alone is not enough: doctors' template replies recur).
    held_out = [(_content(turns[0][1]), _content(text for _, text in turns[1:]))
                for p in held_out_paths for turns in read_split(p, skipped)]
    kept, seen, duplicates, removed = [], set(), 0, 0
    for consultation in read_raw(raw_path, skipped):
        text = dialogue_text(consultation['turns'])
        if text in seen:
            duplicates += 1
        elif any(_same_consultation(consultation, description, dialogue) for description, dialogue in held_out):
            removed += 1
        else:
            kept.append(consultation['turns'])
        seen.add(text)
    report = {'consultations_kept': len(kept), 'duplicates_removed': duplicates, 'val_test_removed': removed}
    print(f'COVID raw: kept {len(kept)} consultations, removed {duplicates} duplicates and {removed} '
          f'holding one of the {len(held_out)} validation/test dialogues')
    return kept, report, [raw_path] + held_out_paths


def _same_consultation(consultation, description, dialogue):
    if len(description) >= 20 and description[:20] in consultation['description']:
        return True
    return description[:10] in consultation['description'] and dialogue in consultation['dialogue']


def main():
    started = time.time()
    args = arg_parser(__doc__, 'covid').parse_args()
    skipped = Skipped()
    paths = {split: source_file(rel, args.src) for split, rel in SPLIT_FILES.items()}
    splits = {split: [{'turns': turns, 'entities': (), 'label': -1} for turns in read_split(path, skipped)]
              for split, path in paths.items()}
    build_example_set(args, splits, [], skipped, list(paths.values()), started)


if __name__ == '__main__':
    exit_on_data_error(main)
