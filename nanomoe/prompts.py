"""One check for every prompt a command takes (train.py's --sample_prompt, both samplers,
``python -m conversion compare``), made before any model is built or run is written."""

from __future__ import annotations

from .errors import NanoMoeError


class PromptError(NanoMoeError, ValueError):
    """A prompt that no tokenizer can encode (empty, or not valid UTF-8)."""


def check_prompt(text: str, flag: str = "--prompt") -> str:
    """Return ``text`` if it can be encoded, else raise one sentence naming ``flag``.

    Bytes that are not UTF-8 reach Python's argv as lone surrogates (``'\\udcff'`` for a
    shell's ``$'\\xff'``), and so does a JSON string such as ``"\\ud800"``: neither can be
    encoded by any tokenizer, so they are refused here rather than after training."""
    if not isinstance(text, str):
        raise PromptError(f"{flag} must be text, got {type(text).__name__}")
    if not text:
        raise PromptError(f"{flag} is empty: give some text for the model to continue")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{flag} is not valid UTF-8 text (character {e.start} is "
                          f"{text[e.start]!r}): give the prompt as UTF-8 text") from None
    return text
