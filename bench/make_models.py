"""Build the benchmark models: random weights in real shapes, saved with transformers, 4-bit GGUF via
`mamba-cli quantize` (byte-identical to llama.cpp's own quantizer; see tests/test_quantize.py).

    python -m bench.make_models            # -> bench/.cache/*.gguf (git-ignored), paths printed

    python -m bench.make_models --7b [--layers N] [--model NAME] [q4_k_m]   # 7B shapes -> bench/.cache/*.gguf

Shapes: mamba-130m (d_model 768, 24 layers), a Mamba-2 of similar size (d_model 768, 24 layers,
head dim 64, d_state 128), a small Jamba (d_model 768, 8 layers, attention 1 in 4, MoE 1 in 2,
8 experts top-2). Vocabulary: Mistral's 32000-token SentencePiece (so llama.cpp accepts the file).

7B shapes (--7b; random weights written straight to bf16 safetensors, one shard per layer, so
building them needs no more memory than one layer): Mistral-7B (4096 wide, GQA 32/8, FFN 14336,
32 layers), Codestral-Mamba-7B (Mamba-2, 4096 wide, 64 layers, 128 heads of 64, 8 groups, d_state
128) and Mixtral-8x7B (Mistral-7B's layer with 8 experts, top 2: 2.8 GB of bf16 per layer, so it is
built only when named with --model, and with few layers). Vocabulary 32000 (the SentencePiece v1 that
ships in mistral-common; the real ones have 32768). --layers N keeps the width and cuts the depth
(everyday runs: 4; Mixtral: 1 or 2). The GGUF files come from `mamba-cli quantize` (byte-identical to
llama.cpp's quantizer, tests/test_quantize.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / ".cache"

MODELS = {
    "mamba-130m": ("MambaForCausalLM", dict(hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                                            conv_kernel=4)),
    "mamba2-130m": ("Mamba2ForCausalLM", dict(hidden_size=768, num_hidden_layers=24, state_size=128, expand=2,
                                              head_dim=64, num_heads=24, n_groups=1, conv_kernel=4,
                                              chunk_size=64)),
    "jamba-small": ("JambaForCausalLM", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                             num_attention_heads=12, num_key_value_heads=4, attn_layer_period=4,
                                             attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                                             num_experts=8, num_experts_per_tok=2, mamba_d_state=16,
                                             mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False)),
}


MODELS_7B = {
    "mistral-7b": ("MistralForCausalLM", 32, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                  num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                                                  max_position_embeddings=32768, sliding_window=None,
                                                  tie_word_embeddings=False)),
    "codestral-mamba-7b": ("Mamba2ForCausalLM", 64, dict(hidden_size=4096, state_size=128, expand=2, head_dim=64,
                                                         num_heads=128, n_groups=8, conv_kernel=4, chunk_size=256,
                                                         tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralForCausalLM", 32, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                    num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                                                    max_position_embeddings=32768, sliding_window=None,
                                                    num_local_experts=8, num_experts_per_tok=2,
                                                    tie_word_embeddings=False)),
}
DEFAULT_7B = ("mistral-7b", "codestral-mamba-7b")  # what --7b builds without --model


def hub_names(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """transformers 5 keeps a Mixtral's experts fused (mlp.experts.gate_up_proj (X, 2I, E), down_proj
    (X, E, I)); the Hub's checkpoints have one matrix per expert (block_sparse_moe.experts.N.w1/w3/w2)."""
    out = {}
    for key, shape in shapes.items():
        if ".mlp.experts.gate_up_proj" in key:
            pre = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(shape[0]):
                out[f"{pre}.{e}.w1.weight"] = out[f"{pre}.{e}.w3.weight"] = (shape[1] // 2, shape[2])
        elif ".mlp.experts.down_proj" in key:
            pre = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(shape[0]):
                out[f"{pre}.{e}.w2.weight"] = tuple(shape[1:])
        else:
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = shape
    return out


def build_7b(name: str, layers: int | None) -> Path:
    """A 7B-shaped checkpoint with random bf16 weights (std 0.02; norms 1; Mamba's A_log, D, dt_bias
    as the reference init), a Mistral SentencePiece tokenizer, cached under bench/.cache."""
    import json

    import mistral_common
    import torch
    import transformers
    from safetensors.torch import save_file

    cls, full, cfg = MODELS_7B[name]
    n = layers or full
    folder = OUT / f"{name}-{n}l"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(vocab_size=32000, num_hidden_layers=n,
                                                                          **cfg)
    config.architectures = [cls]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = hub_names({k: v.shape for k, v in getattr(transformers, cls)(config).state_dict().items()})
    g = torch.Generator().manual_seed(0)

    def make(key: str, shape) -> torch.Tensor:
        if key.endswith("A_log"):
            return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32)).to(torch.bfloat16)
        if key.endswith((".D", "norm.weight", "norm_f.weight", "layernorm.weight")):
            return torch.ones(shape, dtype=torch.bfloat16)
        if key.endswith("dt_bias"):
            return torch.full(shape, -4.0, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    index, groups = {}, {}
    for key in shapes:
        parts = key.split(".")
        layer = parts[parts.index("layers") + 1] if "layers" in parts else "rest"
        groups.setdefault(layer, []).append(key)
    for i, (group, keys) in enumerate(groups.items()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: make(k, shapes[k]) for k in keys}, str(folder / shard), metadata={"format": "pt"})
        index.update({k: shard for k in keys})
        print(f"{name}: shard {i + 1}/{len(groups)} ({group})", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(config.to_json_string())
    tok = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    (folder / "tokenizer.model").write_bytes(tok.read_bytes())
    (folder / "done").write_text("ok")
    return folder


def quantize_7b(folder: Path, qtype: str, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "cli", "quantize", str(folder), "-t", qtype, "-o", str(out), "--no-eval"],
                   check=True, cwd=ROOT)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    args = sys.argv[1:]
    if "--7b" in args:
        args.remove("--7b")
        layers = None
        if "--layers" in args:
            i = args.index("--layers")
            layers = int(args[i + 1])
            del args[i:i + 2]
        names = DEFAULT_7B
        if "--model" in args:
            i = args.index("--model")
            names = (args[i + 1],)
            del args[i:i + 2]
        for name in names:
            folder = build_7b(name, layers)
            for qtype in args or ["q4_k_m"]:
                out = OUT / f"{folder.name}-{qtype}.gguf"
                if not out.exists():
                    quantize_7b(folder, qtype, out)
                print(out)
        return
    from tests.fixtures import build_tiny, spm_model_folder

    for name, (cls, cfg) in MODELS.items():
        folder = spm_model_folder(build_tiny(cls, cfg, vocab_size=32000))
        for qtype in args or ["q4_0"]:
            out = OUT / f"{name}-{qtype}.gguf"
            if not out.exists():
                subprocess.run([sys.executable, "-m", "cli", "quantize", str(folder), "-t", qtype, "-o", str(out),
                                "--no-eval"], check=True, cwd=ROOT)
            print(out)


if __name__ == "__main__":
    main()
