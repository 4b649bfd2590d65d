"""From a name to a local path: the cached snapshot, else a pull (unless HF_HUB_OFFLINE=1).

    pull(source, revision, token, progress)   pull a model into the store (only what is missing)
    resolve_model(source, revision, progress) what load_model's resolver calls: alias / repo id /
                                              repo:QUANT -> a local folder or .gguf
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import MambaCliError
from store.download import Progress, download, plan_pull
from store.local import find_local
from store.refs import ModelRef, offline, parse_ref


def pull(source: str | ModelRef, revision: str | None = None, token: str | None = None,
         progress: Progress | None = None) -> Path:
    """Pull a model into the store (only what is missing) and return the path load_model opens."""
    ref = parse_ref(source) if isinstance(source, str) else source
    if offline():
        local = find_local(ref, revision)
        if local is not None:
            return local
        raise MambaCliError(f"{ref} is not in the local store and HF_HUB_OFFLINE=1 is set; unset it and run "
                            f"`mamba-cli pull {ref}`")
    return download(plan_pull(ref, revision, token), token, progress)


def resolve_model(source: str, revision: str | None = None, progress: Progress | None = None) -> Path:
    """Alias / repo id / repo:QUANT -> a local folder or .gguf; pulls on first use unless HF_HUB_OFFLINE=1."""
    ref = parse_ref(source)
    local = find_local(ref, revision)
    if local is not None:
        return local
    if offline():
        raise MambaCliError(f"{source} is not in the local store and HF_HUB_OFFLINE=1 is set; run "
                            f"`mamba-cli pull {source}` with network access first")
    return pull(ref, revision, progress=progress)
