"""Typed errors of the model layer. Callers (CLI, service) map them to messages and HTTP codes."""


class LVLMError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedModelError(LVLMError):
    """The checkpoint's architecture has no adapter."""


class ImageError(LVLMError, ValueError):
    """An image could not be read or decoded."""


class PromptError(LVLMError, ValueError):
    """A prompt is malformed: missing image token, too long for the context, empty."""


class ContextLengthError(PromptError):
    """The prompt (image tokens included) plus max_new_tokens does not fit the model's context."""


class ModelUnavailableError(LVLMError, OSError):
    """A model name that is neither built in, a local folder, nor a hub id that can be fetched; the
    message says why in one line (offline variable set, no network, gated, not found)."""
