"""Errors that users can cause. Each message says what to do next."""


class RagError(Exception):
    """Base class: the CLI prints it as one line, the server as a JSON reason."""

    status_code = 500


class InputError(RagError):
    """The request or the command line is wrong."""

    status_code = 422


class SourceError(RagError):
    """A path, URL or archive can't be read."""

    status_code = 400


class StoreError(RagError):
    """Milvus is unreachable, locked, or holds an incompatible collection."""

    status_code = 503


class EmbeddingError(RagError):
    """The embedding model can't be loaded."""

    status_code = 500


class LLMError(RagError):
    """DeepSeek (or the OpenAI-compatible endpoint) failed."""

    status_code = 502


class LLMTimeoutError(LLMError):
    """DeepSeek stalled or went past the answer's deadline."""

    status_code = 504
