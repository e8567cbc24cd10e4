import subprocess
import sys

HEAVY = ["diffusers", "faiss", "gradio", "webdataset", "open_clip", "transformers", "safetensors"]


def test_import_gill_stays_light():
    code = (
        "import sys, gill\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_never_imports_the_recipes():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "gill"
    pattern = re.compile(r"^\s*(from|import)\s+(training|index|app|scripts)\b", re.M)
    offenders = [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
