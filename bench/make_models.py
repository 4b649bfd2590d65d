"""Build the benchmark models: random weights in real shapes, saved with transformers, 4-bit GGUF via
`mamba-cli quantize` (byte-identical to llama.cpp's own quantizer; see tests/test_quantize.py).

    python -m bench.make_models            # -> bench/.cache/*.gguf (git-ignored), paths printed

Shapes: mamba-130m (d_model 768, 24 layers), a Mamba-2 of similar size (d_model 768, 24 layers,
head dim 64, d_state 128), a small Jamba (d_model 768, 8 layers, attention 1 in 4, MoE 1 in 2,
8 experts top-2). Vocabulary: Mistral's 32000-token SentencePiece (so llama.cpp accepts the file).
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


def main() -> None:
    from tests.fixtures import build_tiny, spm_model_folder

    OUT.mkdir(parents=True, exist_ok=True)
    for name, (cls, cfg) in MODELS.items():
        folder = spm_model_folder(build_tiny(cls, cfg, vocab_size=32000))
        for qtype in sys.argv[1:] or ["q4_0"]:
            out = OUT / f"{name}-{qtype}.gguf"
            if not out.exists():
                subprocess.run([sys.executable, "-m", "cli", "quantize", str(folder), "-t", qtype, "-o", str(out),
                                "--no-eval"], check=True, cwd=ROOT)
            print(out)


if __name__ == "__main__":
    main()
