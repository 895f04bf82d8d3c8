"""
Measures of generated replies against reference replies, as the medical dialogue papers report them
(MedDG, IMCS-21): BLEU-n, Distinct-n and entity precision/recall/F1 (tasks.Dialogue.reply_scores); and the
macro-F1 of class predictions (tasks.py's classification tasks).

- BLEU: sacrebleu's corpus BLEU with its Chinese tokenisation (`tokenize='zh'`: each CJK character a
  token), n-grams up to n; 0-100.
- Distinct-n: distinct character n-grams over all character n-grams of the generated replies (Li et al.'s
  measure of diversity); 0-1.
- Entity P/R/F1: the medical entities (lexicon terms, found by the longest match tagging.py's Tagger uses)
  mentioned in each generated reply vs in its reference, as sets per reply, summed over replies (micro).
- Gold entity P/R/F1, for a set whose entity ids come from its own labels (IMCS-21): a reference's entities
  are the spans its annotators marked; a generated reply has no annotation, so its entities are the strings
  annotators marked in the training replies (of the labelled dialogues), found by longest match (terms_in).
"""

from collections import Counter

import numpy as np
from sacrebleu.metrics import BLEU


def bleu(generated, references, n):
    return BLEU(tokenize="zh", max_ngram_order=n).corpus_score(generated, [references]).score


def distinct(texts, n):
    grams = [text[i : i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def entities_in(text, tagger):
    """The distinct lexicon terms text mentions (tagging.py's forward maximum matching)."""
    return {term for _, term in tagger.lexicon_matches(text)}


def terms_in(text, terms, longest):
    """The distinct terms of a set that text mentions, by forward maximum matching (longest term first)."""
    found, i = set(), 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i : i + n] in terms:
                found.add(text[i : i + n])
                i += n
                break
        else:
            i += 1
    return found


def entity_scores(generated_sets, reference_sets):
    """Micro precision, recall and F1 of the entity sets of each generated reply against its reference's."""
    hits = sum(len(g & r) for g, r in zip(generated_sets, reference_sets))
    n_generated, n_reference = sum(map(len, generated_sets)), sum(map(len, reference_sets))
    precision = hits / n_generated if n_generated else 0.0
    recall = hits / n_reference if n_reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def reply_variety(generated):
    """How many different replies the model gives: the share of distinct reply texts among the generated ones,
    and the largest share of sources that got one and the same reply (a model that answers everyone alike: 1.0)."""
    counts = Counter(generated)
    return dict(
        distinct_replies=len(counts) / max(len(generated), 1),
        top_reply_share=max(counts.values(), default=0) / max(len(generated), 1),
    )


def score_replies(generated, references, tagger, reference_spans, gold_terms=None):
    """BLEU-1/2/4, Distinct-1/2 and entity P/R/F1 of the generated replies against their references; given
    the annotated vocabulary (gold_terms), also the gold entity P/R/F1 against each reference's annotated spans."""
    precision, recall, f1 = entity_scores(
        [entities_in(t, tagger) for t in generated], [entities_in(t, tagger) for t in references]
    )
    scores = dict(
        generated=len(generated),
        bleu1=bleu(generated, references, 1),
        bleu2=bleu(generated, references, 2),
        bleu4=bleu(generated, references, 4),
        distinct1=distinct(generated, 1),
        distinct2=distinct(generated, 2),
        entity_precision=precision,
        entity_recall=recall,
        entity_f1=f1,
        **reply_variety(generated),
    )
    if gold_terms is not None:
        longest = max(map(len, gold_terms), default=1)
        precision, recall, f1 = entity_scores([terms_in(t, gold_terms, longest) for t in generated], reference_spans)
        scores.update(gold_entity_precision=precision, gold_entity_recall=recall, gold_entity_f1=f1)
    return scores


def macro_f1(predictions, labels):
    """F1 averaged over the classes present in labels (a prediction of no class counts as wrong)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = []
    for c in np.unique(labels):
        true_pos = np.sum((predictions == c) & (labels == c))
        precision = true_pos / max(np.sum(predictions == c), 1)
        recall = true_pos / np.sum(labels == c)
        scores.append(0.0 if true_pos == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))
