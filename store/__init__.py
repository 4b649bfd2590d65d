"""The local model store and the Hub: the only package that talks to the network.

    refs.py      aliases, `owner/repo[:QUANT]` references, the Hub cache's location (environment)
    select.py    which files of a repo listing a model needs (never pickle, never blind)
    paths.py     Hub names, commit ids and hashes checked before they become paths; writes kept in the store
    download.py  plan_pull (one listing call) and download: resumable, verified, progress via a callback
    local.py     find_local, list / describe / rm of what the store holds (no network), where a stored
                 4-bit copy of a float model goes
    resolve.py   pull, and resolve_model: a name -> a local folder or .gguf, pulling on first use

Files live in the standard Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), so huggingface_hub, transformers and llama.cpp's tools share what mamba-cli
pulls, and the other way round.

Importing the store makes it runtime.load_model's resolver (runtime.loader.set_resolver): load_model
then opens repo ids and aliases too, asking resolve_model for the local path. The runtime itself never
imports the store.
"""

from runtime.loader import set_resolver
from store.download import Plan, Progress, RemoteFile, download, format_size, pending, plan_pull
from store.local import (
    Removal,
    StoreEntry,
    describe,
    find_entries,
    find_entry,
    find_local,
    fresh_copy,
    plan_removal,
    quantized_path,
    remove_entries,
    store_entries,
)
from store.paths import within
from store.refs import ALIASES, DEFAULT_QUANT, Alias, ModelRef, cache_dir, offline, parse_ref, repo_dir
from store.resolve import pull, resolve_model
from store.select import Selection, gguf_quant, gguf_variants, select_files

set_resolver(resolve_model)

__all__ = ["ALIASES", "DEFAULT_QUANT", "Alias", "ModelRef", "Plan", "Progress", "RemoteFile", "Removal",
           "Selection", "StoreEntry", "cache_dir", "describe", "download", "find_entries", "find_entry", "find_local",
           "format_size", "fresh_copy", "gguf_quant", "gguf_variants", "offline", "parse_ref", "pending", "plan_pull",
           "plan_removal", "pull", "quantized_path", "remove_entries", "repo_dir", "resolve_model", "select_files",
           "store_entries", "within"]
