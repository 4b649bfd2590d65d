"""Suite-wide settings. tests/ is a package: pytest puts the repository root on sys.path, so tests
import `runtime`, `quant`, `cli` and `tests.fixtures` as packages."""

import os

# The CLI compiles chat's decode step by default (runtime/compile.py): seconds per model shape, too slow
# for hundreds of tiny models. Tests run eagerly; tests/test_compile.py turns compilation back on.
os.environ.setdefault("MAMBA_CLI_NO_COMPILE", "1")
