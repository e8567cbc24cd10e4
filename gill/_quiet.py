"""The old name of ``gill.quiet`` (public now): kept so that older callers keep working."""

from gill.quiet import NOISY_LOGGERS, quiet  # noqa: F401
