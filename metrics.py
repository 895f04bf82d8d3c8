"""
Measures of generated replies against reference replies, as the medical dialogue papers report them
(MedDG, IMCS-21): BLEU-n, Distinct-n and entity precision/recall/F1. Used by tasks.generation_scores.

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
from sacrebleu.metrics import BLEU


def bleu(generated, references, n):
    return BLEU(tokenize="zh", max_ngram_order=n).corpus_score(generated, [references]).score


def distinct(texts, n):
    grams = [text[i:i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def entities_in(text, tagger):
    """The distinct lexicon terms text mentions (tagging.py's forward maximum matching)."""
    return {term for _, term in tagger.lexicon_matches(text)}


def terms_in(text, terms, longest):
    """The distinct terms of a set that text mentions, by forward maximum matching (longest term first)."""
    found, i = set(), 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i:i + n] in terms:
                found.add(text[i:i + n])
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
