"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class PrunekitError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits 2.

    The message should say what is wrong and how to fix it, e.g.
    ``unknown model 'foo': use one of smollm2-135m, minilm-l6, a local folder or a hub id``.
    """


class UnreachableError(PrunekitError):
    """A remote source (Hugging Face hub, apt) could not be reached."""
