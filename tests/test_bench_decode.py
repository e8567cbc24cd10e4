"""scripts/bench_decode.py --check-fp32-tokens: passes (exit 0) when the static decoder decodes the eager
forward's greedy tokens in float32, and exits 1 naming the agreeing prefix when they differ."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

ARGS = ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"]


@pytest.fixture
def bench():
    import bench_decode

    return bench_decode


def test_check_fp32_tokens_passes_when_the_paths_agree(bench, capsys):
    assert bench.main(ARGS + ["--check-fp32-tokens"]) == 0
    assert "fp32 tokens, static vs eager transformers: pass (first 4 of 4 agree)" in capsys.readouterr().out


def test_check_fp32_tokens_exits_1_when_the_fast_path_decodes_other_tokens(bench, monkeypatch, capsys):
    """The static decoder made to change its third token: the check fails and the script exits 1, while
    the same broken decoder without the check exits 0 (the cached baseline on a CPU is not the static one)."""
    real = bench.decode

    def static_changes_a_token(model, embeds, mask, options, *a, **k):
        results = real(model, embeds, mask, options, *a, **k)
        if options.backend == "static":
            results[0].token_ids[2] += 1
        return results

    monkeypatch.setattr(bench, "decode", static_changes_a_token)
    assert bench.main(ARGS + ["--check-fp32-tokens"]) == 1
    assert "fp32 tokens, static vs eager transformers: FAIL (first 2 of 4 agree)" in capsys.readouterr().out
    assert bench.main(ARGS) == 0
