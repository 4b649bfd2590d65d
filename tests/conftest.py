import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import os  # noqa: E402

# The CLI compiles chat's decode step by default (runtime/compile.py): seconds per model shape, too slow
# for hundreds of tiny models. Tests run eagerly; tests/test_compile.py turns compilation back on.
os.environ.setdefault("MAMBA_CLI_NO_COMPILE", "1")
