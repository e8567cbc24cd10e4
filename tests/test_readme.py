import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_pipeline_quick_start_runs():
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    assert len(scope["batch"]) == 2
    # with the model's own settings (no others given) the toy answers with a picture
    assert any(type(s).__name__ in ("GeneratedImage", "RetrievedImage") for s in scope["answer"]), scope["answer"]


def test_readme_model_quick_start_runs():
    scope: dict = {}
    exec(compile(python_blocks()[1], "README.md", "exec"), scope)
    assert scope["gen"].shape == (1, scope["config"].gen_seq_len, scope["config"].gen_emb_dim)
    assert scope["scores"].shape == (1, 1)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in README.read_text() and command in ci
