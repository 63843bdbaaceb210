"""Typed errors of the evaluation package.

The CLI and the service map them to messages; tests assert on the type. Every message says what
was wrong and, where there is one, how to fix it.
"""

from __future__ import annotations


class EvalError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageIdError(EvalError, ValueError):
    """An image id that is not an integer, or not present in the ground truth.

    docs/eval.md (CHAIR): a missing id is an error, never an empty set — a string "226988" instead of 226988
    would otherwise make every mention a hallucination.
    """


class AnnotationError(EvalError, ValueError):
    """A COCO annotation file, ground-truth mapping or question file that cannot be used."""


class NLTKDataError(EvalError, LookupError):
    """NLTK cannot find the tokenizer, tagger or WordNet data that CHAIR needs."""


class PopeBuildError(EvalError, ValueError):
    """A POPE split cannot be built from the given object lists (too few images or objects)."""


class ParserError(EvalError, ValueError):
    """An unknown answer-parser name (the message lists the valid ones)."""


class ResultsFileError(EvalError, ValueError):
    """A results file that cannot be resumed (a corrupt line before the last one)."""
