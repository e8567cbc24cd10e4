"""The Gradio chat app: ``python -m app``. Nothing is loaded at import time."""
