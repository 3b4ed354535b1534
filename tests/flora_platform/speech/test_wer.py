"""WER against hand-computed cases and an independent recursive edit distance."""

import functools
import random

import pytest

from flora_platform.speech.wer import LanguageWER, normalise_text, wer, wer_by_language, word_errors


def recursive_edit_distance(ref: tuple[str, ...], hyp: tuple[str, ...]) -> int:
    """The textbook recursion, memoised: the definition the row-by-row version must match."""
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (ref[i - 1] != hyp[j - 1]))
    return d(len(ref), len(hyp))


@pytest.mark.parametrize("reference,hypothesis,expected", [
    ("a b c", "a b c", (0, 3)),
    ("a b c", "a x c", (1, 3)),                          # substitution
    ("a b", "a b c", (1, 2)),                            # insertion
    ("a b c", "a c", (1, 3)),                            # deletion
    ("a b c", "", (3, 3)),                               # empty hypothesis: every word deleted
    ("", "a b", (2, 0)),
    ("", "", (0, 0)),
    ("the cat sat on the mat", "the cat sit on mat", (2, 6)),  # sat->sit, the deleted
    ("a b c d", "b c d a", (2, 4)),                      # delete a at the front, insert it at the end
    ("Hello world", "hello world", (1, 2)),              # unnormalised: case is an error
    ("  a \t b\n", "a b", (0, 2)),                       # any whitespace separates words
])
def test_word_errors_hand_computed(reference, hypothesis, expected):
    assert word_errors(reference, hypothesis) == expected


def test_word_errors_match_the_recursive_definition():
    rng = random.Random(0)
    for _ in range(200):
        ref = tuple(rng.choices("abcd", k=rng.randint(0, 7)))
        hyp = tuple(rng.choices("abcd", k=rng.randint(0, 7)))
        assert word_errors(" ".join(ref), " ".join(hyp)) == (recursive_edit_distance(ref, hyp), len(ref))


@pytest.mark.parametrize("text,expected", [
    ("Hello, World!", "hello world"),
    ("¿Dónde está el niño?", "dónde está el niño"),      # Unicode punctuation goes, accents stay
    ("L'homme « calme » — aujourd’hui…", "l homme calme aujourd hui"),
    ("Die Straße ist GROSS.", "die straße ist gross"),
    ("cafe\u0301", "café"),                              # combining accent composed into one letter
    ("  many \t spaces \n here ", "many spaces here"),
    ("", ""),
])
def test_normalise_text(text, expected):
    assert normalise_text(text) == expected


def test_normalisation_removes_case_and_punctuation_errors_only():
    refs, hyps = ["Hello, world!"], ["hello world"]
    assert wer(refs, hyps) == 1.0  # "Hello," != "hello" and "world!" != "world"
    assert wer(refs, hyps, normalise=True) == 0.0
    assert wer(["Guten Tag."], ["guten Abend"], normalise=True) == 0.5


def test_corpus_wer_sums_edits_over_words():
    # Per-utterance rates 0/4 and 1/1 average to 0.5; the corpus rate is 1 edit / 5 words.
    assert wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(0.2)
    assert wer(["a b", "c"], ["", "c d e"]) == pytest.approx(4 / 3)  # insertions can push WER past 1


def test_wer_rejects_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        wer(["", " "], ["a", ""])


def test_wer_by_language():
    rows = [
        ("fr", "Le chat dort.", "le chat dort"),
        ("en", "The dog runs", "The dog runs"),
        ("fr", "Un ami", "un amis"),
        ("en", "a red car", "a car"),
    ]
    result = wer_by_language(rows)
    assert list(result) == ["en", "fr"]
    assert result["en"] == LanguageWER(utterances=2, reference_words=6, wer=1 / 6, normalised_wer=1 / 6)
    # fr unnormalised: Le, dort., Un, ami all wrong = 4/5; normalised: only ami/amis = 1/5.
    assert result["fr"] == LanguageWER(utterances=2, reference_words=5, wer=4 / 5, normalised_wer=1 / 5)
