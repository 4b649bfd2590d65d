"""Suite-wide settings. tests/ is a package: pytest puts the repository root on sys.path, so tests
import `runtime`, `quant`, `cli` and `tests.fixtures` as packages."""

import os

# The CLI compiles chat's decode step by default (runtime/compile.py): seconds per model shape, too slow
# for hundreds of tiny models. Tests run eagerly; tests/test_compile.py turns compilation back on.
os.environ.setdefault("MAMBA_CLI_NO_COMPILE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where torch sees no GPU (everywhere CI runs), whatever CI=true says."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.py runs the same checks on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
