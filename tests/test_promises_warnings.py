"""The suite's warning filters (pyproject): a FutureWarning attributed to our packages (a deprecated call in
our code: libraries warn at their caller's line) fails the test; one inside a library stays a warning."""

import warnings

import pytest


def warn_from(module: str) -> None:
    code = compile("import warnings\nwarnings.warn('this call is deprecated', FutureWarning)", "<probe>", "exec")
    exec(code, {"__name__": module})


@pytest.mark.parametrize("module", ["gill", "gill.pipeline", "app.app", "index.build", "training.train"])
def test_a_future_warning_from_our_code_is_an_error(module):
    with pytest.raises(FutureWarning, match="this call is deprecated"):
        warn_from(module)


@pytest.mark.parametrize("module", ["transformers.modeling_utils", "diffusers.pipelines", "gillette", "indexer"])
def test_a_future_warning_from_elsewhere_is_a_warning(module):
    with warnings.catch_warnings(record=True) as seen:  # the suite's filters kept (pytest.warns would reset them)
        warn_from(module)
    assert [(w.category, str(w.message)) for w in seen] == [(FutureWarning, "this call is deprecated")]
