"""Lexical similarity for XRPO's exemplar retrieval: TF-IDF cosine over word n-grams.

The paper retrieves exemplars with an embedding model; none can be downloaded
here, so questions are compared by TF-IDF cosine over lower-cased word uni- and
bigrams (sublinear tf, smoothed idf).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _terms(text: str) -> Counter[str]:
    tokens = _TOKEN.findall(text.lower())
    return Counter(tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)])


class LexicalIndex:
    """TF-IDF cosine similarity over word uni- and bigrams (sublinear tf, smoothed idf)."""

    def __init__(self) -> None:
        self._docs: dict[str, Counter[str]] = {}
        self._postings: dict[str, set[str]] = {}
        self._norms: dict[str, float] | None = None

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, key: str, text: str) -> None:
        self.remove(key)
        self._docs[key] = _terms(text)
        for term in self._docs[key]:
            self._postings.setdefault(term, set()).add(key)
        self._norms = None

    def remove(self, key: str) -> None:
        for term in self._docs.pop(key, ()):
            self._postings[term].discard(key)
            if not self._postings[term]:
                del self._postings[term]
        self._norms = None

    def _idf(self, term: str) -> float:
        return math.log((1 + len(self._docs)) / (1 + len(self._postings.get(term, ())))) + 1.0

    def scores(self, text: str) -> dict[str, float]:
        """Cosine similarity of ``text`` to every indexed entry sharing a term with it."""
        if self._norms is None:
            self._norms = {
                key: math.sqrt(
                    sum(((1 + math.log(tf)) * self._idf(t)) ** 2 for t, tf in doc.items())
                )
                for key, doc in self._docs.items()
            }
        query = {t: (1 + math.log(tf)) * self._idf(t) for t, tf in _terms(text).items()}
        q_norm = math.sqrt(sum(w * w for w in query.values())) or 1.0
        dots: dict[str, float] = {}
        for term, weight in query.items():
            for key in self._postings.get(term, ()):
                tf = self._docs[key][term]
                dots[key] = dots.get(key, 0.0) + weight * (1 + math.log(tf)) * self._idf(term)
        return {key: dot / (q_norm * (self._norms[key] or 1.0)) for key, dot in dots.items()}
