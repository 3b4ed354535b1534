"""Word error rate: word-level Levenshtein edits over reference words, per corpus and per language.

The FLoRA paper reports WER on unnormalised text (case and punctuation count as errors); the
normalised variant (lower case, punctuation removed) is the one most speech papers compare, so
evaluations report both.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def normalise_text(text: str) -> str:
    """Lower-case, punctuation (any Unicode P* category) to spaces, whitespace collapsed.

    NFKC first, so that a letter written as base + combining accent stays one accented letter;
    accents are kept ("Été" -> "été"), only punctuation goes ("l'homme" -> "l homme").
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + insertions + deletions, number of reference words), words split on whitespace."""
    ref, hyp = reference.split(), hypothesis.split()
    # previous[j]: edits turning ref[:i-1] into hyp[:j]; one row at a time, O(len(hyp)) memory.
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion of ref_word
                current[j - 1] + 1,  # insertion of hyp_word
                previous[j - 1] + (ref_word != hyp_word),  # match or substitution
            )
        previous = current
    return previous[-1], len(ref)


def wer(references: Sequence[str], hypotheses: Sequence[str], *, normalise: bool = False) -> float:
    """Corpus WER: total edits / total reference words (not a mean of per-utterance rates)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses; pass one hypothesis per reference")
    edits = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        if normalise:
            reference, hypothesis = normalise_text(reference), normalise_text(hypothesis)
        e, n = word_errors(reference, hypothesis)
        edits, words = edits + e, words + n
    if words == 0:
        raise ValueError("the references hold no words, so WER is undefined; drop empty references")
    return edits / words


@dataclass(frozen=True)
class LanguageWER:
    utterances: int
    reference_words: int  # unnormalised count; normalising can merge or drop words
    wer: float
    normalised_wer: float


def wer_by_language(rows: Iterable[tuple[str, str, str]]) -> dict[str, LanguageWER]:
    """(locale, reference, hypothesis) rows -> {locale: LanguageWER}, locales sorted."""
    grouped: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for locale, reference, hypothesis in rows:
        grouped[locale][0].append(reference)
        grouped[locale][1].append(hypothesis)
    return {
        locale: LanguageWER(
            utterances=len(refs),
            reference_words=sum(len(r.split()) for r in refs),
            wer=wer(refs, hyps),
            normalised_wer=wer(refs, hyps, normalise=True),
        )
        for locale, (refs, hyps) in sorted(grouped.items())
    }
