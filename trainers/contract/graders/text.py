"""Torch-free scoring functions: string checks, text similarity, regex, length, math.

Each function scores one already-rendered ``input`` against its reference and
returns a float; the registry renders the templates and maps these over a
batch. Libraries are imported inside the functions, so importing this module
costs nothing and a grader only loads what it uses.

Choices where OpenAI does not publish its implementation (documented so a
score can be reproduced):

* ``fuzzy_match``: ``rapidfuzz.fuzz.ratio / 100``, i.e. 1 - Indel distance over
  the summed lengths (``kitten``/``sitting``: LCS 4, 1 - 5/13 = 0.615).
* ``bleu``: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing,
  brevity penalty) / 100.
* ``gleu``: NLTK's sentence GLEU (Wu et al. 2016, Google's NMT paper: the
  minimum of n-gram precision and recall over 1..4-grams), on the same 13a
  tokens as BLEU.
* ``rouge_1``..``rouge_5``, ``rouge_l``: the F-measure of Google's
  ``rouge-score`` package, without stemming, on lower-cased Unicode word
  tokens (the package's own tokenizer drops every non-ASCII letter, which would
  score most non-English text 0).
* ``meteor`` is refused at validation: NLTK's METEOR needs the WordNet corpus,
  which is not on PyPI and cannot be fetched by a posttrain host.
* ``cosine`` needs an embedding model and is computed in the training process
  (``trainers.graders.model``).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Literal

from trainers.contract.graders.templates import GraderError

__all__ = [
    "length_penalty",
    "math_verify",
    "regex_match",
    "string_check",
    "text_similarity",
]

REGEX_TIMEOUT_S = 1.0
MATH_PARSE_TIMEOUT_S = 5
MATH_VERIFY_TIMEOUT_S = 5

_WORD = re.compile(r"\w+")


class RegexTimeout(GraderError):
    """A pattern took too long on one sample (catastrophic backtracking)."""

    soft = True


def string_check(text: str, reference: str, operation: str) -> float:
    """OpenAI's string_check: 1.0 if the check holds, else 0.0.

    ``eq``/``ne``: case-sensitive equality / inequality. ``like``: ``reference``
    occurs in ``text`` (case-sensitive); ``ilike``: the same, ignoring case.
    """
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise ValueError(f"unknown string_check operation {operation!r}")


class _WordTokenizer:
    """rouge-score's tokenizer interface: lower-cased Unicode ``\\w+`` runs."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def _rouge(text: str, reference: str, metric: str) -> float:
    from rouge_score.rouge_scorer import RougeScorer

    key = "rougeL" if metric == "rouge_l" else "rouge" + metric.removeprefix("rouge_")
    scorer = RougeScorer([key], use_stemmer=False, tokenizer=_WordTokenizer())
    return float(scorer.score(reference, text)[key].fmeasure)


def _tokens_13a(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).split()


def text_similarity(text: str, reference: str, metric: str) -> float:
    """A similarity in [0, 1] between ``text`` and ``reference`` (see module docstring).

    Blank texts are decided here, the same way for every metric (the libraries
    disagree): both blank 1.0, one blank 0.0.
    """
    if not text.strip() or not reference.strip():
        return float(text.strip() == reference.strip())
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100.0
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([_tokens_13a(reference)], _tokens_13a(text)))
    if metric.startswith("rouge_"):
        return _rouge(text, reference, metric)
    raise ValueError(f"text_similarity metric {metric!r} is not computed here")


def regex_match(text: str, pattern: str) -> float:
    """1.0 if ``pattern`` matches anywhere in ``text`` (``regex`` module, ``re`` syntax).

    Anchor with ``^``/``$`` and set flags inline (``(?i)``, ``(?s)``). A match
    that runs past ``REGEX_TIMEOUT_S`` raises ``RegexTimeout`` (scored 0).
    """
    import regex

    try:
        return float(regex.search(pattern, text, timeout=REGEX_TIMEOUT_S) is not None)
    except TimeoutError:
        raise RegexTimeout(f"pattern {pattern!r} ran past {REGEX_TIMEOUT_S}s") from None


def length_penalty(
    text: str,
    max_length: int,
    target_length: int,
    unit: Literal["words", "characters"],
) -> float:
    """DAPO's soft overlong penalty, in [-1, 0].

    Paper: Yu et al. 2025, "DAPO", eq. 13 (L_max = ``max_length``, L_cache =
    ``max_length - target_length``). With L the length of ``text``::

        0                               if L <= target_length
        (target_length - L) / L_cache   if target_length < L <= max_length
        -1                              if L > max_length

    E.g. target 80, max 100, L 90 -> -0.5. With target == max it is a hard
    cut-off. Added to a correctness score (a multi grader's ``a + b``) it gives
    DAPO's reward. Departure: DAPO counts tokens; a grader has no tokenizer, so
    this counts whitespace-separated words or characters.
    """
    length = len(text.split()) if unit == "words" else len(text)
    if length <= target_length:
        return 0.0
    if length > max_length:
        return -1.0
    return (target_length - length) / (max_length - target_length)


def math_verify(text: str, reference: str) -> float:
    """1.0 if ``text`` states the same mathematical answer as ``reference``.

    HuggingFace's ``math-verify``: both sides are parsed with its default LaTeX
    and plain-expression extraction (``\\boxed{}`` first), then compared
    symbolically. An unparseable ``reference`` raises ``GraderError`` (a data
    problem); an unparseable ``text`` scores 0. Timeouts use ``signal.alarm``,
    which works only on the main thread; elsewhere (the API's worker threads)
    they are off and the caller must bound the time itself.
    """
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    parse_timeout = MATH_PARSE_TIMEOUT_S if main else None
    verify_timeout = MATH_VERIFY_TIMEOUT_S if main else None
    if not main:
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    gold = parse(reference, parsing_timeout=parse_timeout)
    if not gold:
        raise GraderError(f"math_verify reference {reference[:80]!r} is not a parseable answer")
    answer = parse(text, parsing_timeout=parse_timeout)
    if not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=verify_timeout))
