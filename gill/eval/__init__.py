"""Evaluation harness: ``python -m gill.eval vist|visdial|score``. See ``gill/eval/README.md``."""
