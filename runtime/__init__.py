"""mamba-cli's runtime: turn a model on disk into streamed tokens.

Public API (stable; tests and benchmarks use it):

    m = load_model(source, device="auto", dtype=None, gpu_layers=None)   # folder, .gguf, repo id or alias
    m.config, m.arch, m.tokenizer
    logits = m.forward(tokens)             # LongTensor [B, T] -> FloatTensor [B, T, vocab], no cache
    cache = m.make_cache(batch=1)
    logits = m.forward(tokens, cache)      # advances the cache
    for tok in generate(m, prompt_ids, max_new_tokens=64, temperature=0.0, ...): ...

Repo ids and aliases resolve through the model store (`import store`, as the CLI does); the runtime
itself never talks to the network. The way in: runtime/loader.py -> registry -> runtime/models/<arch>.py
-> runtime/generate.py (docs/architecture.md).
"""

from runtime.errors import MambaCliError, ModelFormatError, ResourceError
from runtime.generate import ContextError, generate
from runtime.loader import LoadedModel, load_model

__all__ = ["load_model", "generate", "LoadedModel", "MambaCliError", "ModelFormatError", "ResourceError",
           "ContextError"]
