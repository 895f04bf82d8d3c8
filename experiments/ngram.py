"""
A character n-gram language model with interpolated modified Kneser-Ney smoothing: the classical
reference row in the perplexity tables, trained on the same text as the GPTs.

Written from the textbook definition (Chen & Goodman 1998, "An empirical study of smoothing
techniques for language modeling", section 3): for a context h and the next character w,

    P_k(w | h) = [c_k(hw) - D_k(c_k(hw))] / c_k(h) + gamma_k(h) * P_(k-1)(w | h less its first char)
    gamma_k(h) = [D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)] / c_k(h)

where c_k(h) is the sum of c_k(hw) over w, D_k(c) is D1, D2 or D3+ as c is 1, 2 or more (0 for
c = 0), and Nj(h.) counts the characters seen after h with count j (3 or more for N3+). The highest
order counts how often each n-gram occurred; lower orders count how many distinct characters came
before it (the continuation count). The discounts of each order come from its count-of-counts.
Below order 1 sits a uniform distribution over the training characters plus one slot for
characters never seen, so every character gets probability > 0.

    model = KneserNey(order=5).fit(texts)        # texts: an iterable of str, one per document
    model.log_prob(context, char)                # natural log of P(char | context)
    bpc, n_chars = model.bits_per_char(texts)

Command line:  python -m experiments.ngram --train a.txt --test b.txt --order 5   (one document per line)
"""

import argparse
import math
import time
from collections import Counter, defaultdict

BOS = '\x02'  # pads the left of every text, so that no context reaches into the previous text
EOS = '\x03'  # ends every text; it is predicted and scored like any other character
# KenLM's --discount_fallback: used where the closed form fails (tiny corpora lack some count).
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


def modified_kn_discounts(n1, n2, n3, n4):
    """D1, D2, D3+ from the numbers of n-grams seen exactly 1, 2, 3, 4 times (Chen & Goodman)."""
    if min(n1, n2, n3, n4) == 0:
        return FALLBACK_DISCOUNTS
    y = n1 / (n1 + 2 * n2)
    discounts = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    # each D_c is below c by construction, but with few data D2 or D3+ can fall to 0 or below
    return discounts if min(discounts) > 0 else FALLBACK_DISCOUNTS


def lower_order_counts(counts):
    """Kneser-Ney counts of the (k-1)-grams, given those of the k-grams: the number of distinct
    characters seen before each one. A lower order only speaks for what the longer contexts have
    not seen, so what matters is in how many contexts a string occurs, not how often. A string
    starting with BOS has nothing but BOS before it, so it keeps its plain count (as KenLM does)."""
    lower = defaultdict(int)
    for gram, count in counts.items():
        suffix = gram[1:]
        lower[suffix] += count if suffix[0] == BOS else 1
    return lower


def context_stats(counts, discounts):
    """For each context h: (c(h), the mass its discounts free for the lower order)."""
    totals, freed = defaultdict(int), defaultdict(float)
    for gram, count in counts.items():
        totals[gram[:-1]] += count
        freed[gram[:-1]] += discounts[min(count, 3)]
    return {h: (totals[h], freed[h]) for h in totals}


class KneserNey:
    def __init__(self, order=5):
        assert order >= 1, 'order is the n-gram length, at least 1'
        self.order = order

    def fit(self, texts):
        n = self.order
        highest = Counter()
        for text in texts:
            if BOS in text or EOS in text:
                raise ValueError('a text holds the BOS or EOS marker character')
            padded = BOS * (n - 1) + text + EOS
            highest.update(padded[i : i + n] for i in range(len(padded) - n + 1))
        # counts[k], discounts[k], contexts[k] are for order k = 1..n (index 0 is unused);
        # counts[k] maps each k-gram, a str, to its count
        self.counts = [None] * (n + 1)
        self.counts[n] = highest
        for k in range(n - 1, 0, -1):
            self.counts[k] = lower_order_counts(self.counts[k + 1])
        # discounts[k][c] is what a k-gram with count c gives up; a count of 0 gives up nothing
        self.discounts = [None]
        self.contexts = [None]
        for k in range(1, n + 1):
            count_of_counts = Counter(self.counts[k].values())
            discounts = (0.0,) + modified_kn_discounts(*(count_of_counts[c] for c in (1, 2, 3, 4)))
            self.discounts.append(discounts)
            self.contexts.append(context_stats(self.counts[k], discounts))
        self.vocab = set(self.counts[1])  # every character seen, and EOS; never BOS (not predicted)
        self.uniform = 1.0 / (len(self.vocab) + 1)  # + 1: the slot for unseen characters
        return self

    def _prob(self, history, char):
        """P(char | history), history being exactly order - 1 characters long."""
        p = self.uniform
        for k in range(1, self.order + 1):
            h = history[len(history) - k + 1 :]
            stats = self.contexts[k].get(h)
            if stats is None:
                # an unseen context passes P_(k-1) on unchanged, and so does every longer one,
                # since a longer context seen in training would have made this one seen too
                break
            total, freed = stats
            count = self.counts[k].get(h + char, 0)
            # no max(..., 0) needed: every discount D_c is below c
            p = (count - self.discounts[k][min(count, 3)] + freed * p) / total
        return p

    def log_prob(self, context, char):
        """Natural log of P(char | context); context is the text so far in this document (the
        start of a document is the empty context) and char may be EOS."""
        padded = BOS * (self.order - 1) + context
        return math.log(self._prob(padded[len(padded) - self.order + 1 :], char))

    def bits_per_char(self, texts):
        """(bits per character, number of characters scored) over the texts. Each text scores
        its characters and its end marker EOS, so n_chars = sum of (len(text) + 1): the end of a
        document is something a model has to predict too."""
        n = self.order
        total_bits, n_chars = 0.0, 0
        for text in texts:
            padded = BOS * (n - 1) + text + EOS
            for i in range(n - 1, len(padded)):
                total_bits -= math.log2(self._prob(padded[i - n + 1 : i], padded[i]))
            n_chars += len(text) + 1
        return total_bits / n_chars, n_chars


def read_documents(paths):
    """One document per non-empty line."""
    documents = []
    for path in paths:
        with open(path, encoding='utf-8') as f:
            documents += [line.rstrip('\n') for line in f if line.strip()]
    return documents


def main():
    parser = argparse.ArgumentParser(description='Character Kneser-Ney n-gram language model.')
    parser.add_argument('--train', nargs='+', required=True, help='UTF-8 text, one document a line')
    parser.add_argument('--test', nargs='+', required=True, help='UTF-8 text, one document a line')
    parser.add_argument('--order', type=int, default=5)
    args = parser.parse_args()
    t0 = time.time()
    model = KneserNey(args.order).fit(read_documents(args.train))
    t1 = time.time()
    bpc, n_chars = model.bits_per_char(read_documents(args.test))
    t2 = time.time()
    print(
        f'order {args.order}: {bpc:.4f} bits/char, ppl/char {2**bpc:.2f} '
        f'over {n_chars} chars (end markers included); fit {t1 - t0:.1f}s, score {t2 - t1:.1f}s'
    )


if __name__ == '__main__':
    main()
