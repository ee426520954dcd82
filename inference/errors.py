"""What the pipeline refuses, by kind: each caller maps the kinds to its own terms once (the service to HTTP
statuses in ``service.errors``, the command-line tools to a message and a skipped image).

Every message says what is wrong and, where there is one, what to do instead; it is written for the person
who sent the image.
"""

from __future__ import annotations


class InputError(ValueError):
    """An image or an option the pipeline will not run."""


class UnsupportedImage(InputError):
    """Not an image format the pipeline reads."""


class ImageTooLarge(InputError):
    """More pixels than the limit, as sent or once resized by the asked scale."""


class CorruptImage(InputError):
    """Data that claims to be an image but cannot be decoded (truncated, corrupt, empty)."""


class UnusableInput(InputError):
    """A decodable image or a valid option the model cannot use: a stack, a missing channel, ``scale=auto``
    for a model that records no object size, options that contradict each other."""
