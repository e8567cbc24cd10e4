"""``python -m gill.eval`` promises with no test before: ``--no-score`` generates and scores nothing (no scorer
loaded), and a scorer that cannot be loaded is refused before anything is generated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gill.presets import toy_metric_dir


@pytest.fixture
def eval_main(monkeypatch):
    """gill.eval's main with this process's logging left alone, and a record of the scorers built and the
    settings generated."""
    import gill._quiet
    import gill.eval.runner as runner
    import gill.eval.scorer as scorer
    from gill.eval.__main__ import main

    monkeypatch.setattr(gill._quiet, "quiet", lambda verbose=False: None)
    seen = {"scorers": [], "generated": []}
    real_clip, real_run = scorer.ClipScorer, runner.run_setting

    class Recorded(real_clip):
        def __init__(self, spec, *a, **k):
            seen["scorers"].append(spec)
            super().__init__(spec, *a, **k)

    def run_setting(gill, dataset, setting, *a, **k):
        seen["generated"].append(setting.name)
        return real_run(gill, dataset, setting, *a, **k)

    monkeypatch.setattr(scorer, "ClipScorer", Recorded)
    monkeypatch.setattr(runner, "run_setting", run_setting)
    return main, seen


def visdial(root: Path) -> list[str]:
    images = root / "img"
    images.mkdir()
    for i, colour in ((1, "red"), (2, "blue")):
        Image.new("RGB", (32, 32), colour).save(images / f"VisualDialog_val2018_{i:012d}.jpg")
    dialogs = [{"image_id": i, "caption": f"a {c} square", "dialog": [{"question": 0, "answer": 0}]}
               for i, c in ((1, "red"), (2, "blue"))]
    (root / "v.json").write_text(json.dumps({"data": {"questions": ["what colour is it"], "answers": ["that one"],
                                                      "dialogs": dialogs}}))
    return ["visdial", "--model", "tiny-random", "--dialogs", str(root / "v.json"), "--images", str(images),
            "--steps", "1", "--rounds", "1", "--settings", "gill/1-round"]


def outputs(out: Path) -> list[Path]:
    return sorted(out.glob("*/*/records.jsonl"))


def test_no_score_generates_and_loads_no_scorer_nor_writes_scores(tmp_path, eval_main, capsys):
    """--no-score: the outputs are generated, no scorer is built and no summary.json is written; the same run
    with a scorer writes it (scored outputs: the toy's metric CLIP, a local copy)."""
    main, seen = eval_main
    base = visdial(tmp_path)
    assert main(base + ["--out", str(tmp_path / "unscored"), "--no-score"]) == 0
    assert seen == {"scorers": [], "generated": ["gill/1-round"]}
    assert outputs(tmp_path / "unscored") and not (tmp_path / "unscored" / "summary.json").exists()
    assert f"generated; score with: python -m gill.eval score {tmp_path / 'unscored'} --task visdial" in capsys.readouterr().out
    scorer = f"hf:{toy_metric_dir()}"
    assert main(base + ["--out", str(tmp_path / "scored"), "--scorer", scorer]) == 0
    assert seen["scorers"] == [scorer]
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["settings"]["gill/1-round"]["n"] == 2


def test_a_scorer_that_cannot_be_loaded_is_refused_before_generating(tmp_path, eval_main, capsys):
    """--scorer naming a folder that holds no CLIP: one line naming the scorer, exit 1, and nothing generated
    (no setting run, no output written)."""
    main, seen = eval_main
    (tmp_path / "not-clip").mkdir()
    out = tmp_path / "out"
    assert main(visdial(tmp_path) + ["--out", str(out), "--scorer", f"hf:{tmp_path / 'not-clip'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: scorer 'hf:{tmp_path / 'not-clip'}' cannot be loaded"), err
    assert seen == {"scorers": [f"hf:{tmp_path / 'not-clip'}"], "generated": []}
    assert outputs(out) == []
