"""The oracles themselves: the llama.cpp version is pinned once, and a missing oracle skips on a
developer's machine but fails under CI=true (where .ci/run installs every oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fixtures

ROOT = Path(__file__).resolve().parents[1]


def test_llama_cpp_pin_is_one_version():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert f'\nllamacpp = ["llama-cpp-python=={fixtures.LLAMA_CPP_VERSION}"]\n' in pyproject


@pytest.mark.llamacpp
def test_installed_llama_cpp_is_the_pinned_one():
    """The compiled llama.cpp and the converter / test-gguf.cpp read from the sdist are the same release."""
    assert fixtures.llama_cpp().__version__ == fixtures.LLAMA_CPP_VERSION


@pytest.mark.parametrize("ci", [False, True])
def test_missing_oracle_skips_or_fails_under_ci(monkeypatch, ci):
    monkeypatch.setattr(fixtures, "IN_CI", ci)
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="no such oracle"):
        fixtures.missing_oracle("no such oracle")
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="not_a_module_anywhere"):
        fixtures.need("not_a_module_anywhere", "needs not_a_module_anywhere")
