"""Every tiny configuration the shared runner (tests/test_architectures.py) checks, by family.

Each entry is (transformers class, config kwargs) for tests.fixtures.build_tiny; each varies the shapes
that code paths depend on (GQA ratios, head_dim, windows, experts, conv kernels, groups, chunk sizes,
biases, tied embeddings). The per-family files take their configurations from here.
"""

from __future__ import annotations

M1, F1, M2, J = "MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM", "JambaForCausalLM"

LLAMA = {
    # GQA ratio 2, sliding window (16) much shorter than the prompts
    "mistral-window": ("MistralForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=16)),
    # GQA ratio 4, explicit head_dim (8*16 != 64), tied embeddings, rope_theta 1e6
    "llama-gqa4-tied": ("LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                                 tie_word_embeddings=True, rope_theta=1e6)),
    # GQA ratio 1 (multi-head), untied, attention biases
    "llama-mha-bias": ("LlamaForCausalLM", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=4,
                                                attention_bias=True, tie_word_embeddings=False)),
    # 4 experts, top-2, with a sliding window
    "mixtral-4x-window": ("MixtralForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2,
                                                     num_local_experts=4, num_experts_per_tok=2,
                                                     sliding_window=12)),
    # 8 experts, top-2, GQA 4
    "mixtral-8x-gqa4": ("MixtralForCausalLM", dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=8, num_key_value_heads=2,
                                                   num_local_experts=8, num_experts_per_tok=2)),
}

MAMBA = {
    "mamba-k4": (M1, dict(hidden_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2)),
    "mamba-k2-bias": (M1, dict(hidden_size=48, state_size=16, num_hidden_layers=2, conv_kernel=2, expand=1,
                               time_step_rank=7, use_bias=True, use_conv_bias=False)),
    "falcon-k3": (F1, dict(hidden_size=64, state_size=4, num_hidden_layers=3, conv_kernel=3, expand=2,
                           time_step_rank=5, tie_word_embeddings=False)),
    "mamba2-g1": (M2, dict(hidden_size=64, expand=2, head_dim=16, num_heads=8, n_groups=1, state_size=8,
                           num_hidden_layers=2, conv_kernel=4, chunk_size=16)),
    "mamba2-g2": (M2, dict(hidden_size=32, expand=2, head_dim=8, num_heads=8, n_groups=2, state_size=16,
                           num_hidden_layers=2, conv_kernel=3, chunk_size=32, tie_word_embeddings=True)),
    "mamba2-g4": (M2, dict(hidden_size=64, expand=2, head_dim=32, num_heads=4, n_groups=4, state_size=4,
                           num_hidden_layers=2, conv_kernel=2, chunk_size=64, use_bias=True)),
}


def jamba(layers, period, offset, e_period, e_offset, experts, top_k, heads, kv, **kw) -> tuple[str, dict]:
    return J, dict(num_hidden_layers=layers, attn_layer_period=period, attn_layer_offset=offset,
                   expert_layer_period=e_period, expert_layer_offset=e_offset, num_experts=experts,
                   num_experts_per_tok=top_k, num_attention_heads=heads, num_key_value_heads=kv, **kw)


# attention periods 2/4/8 with offsets, 4-16 experts, top-1/2, GQA ratios 1/2/8
JAMBA = {
    "jamba-p2-x4-top2-gqa2": jamba(4, 2, 1, 2, 1, 4, 2, 4, 2, hidden_size=64, intermediate_size=64,
                                   mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    "jamba-p4-x8-top1-gqa8": jamba(8, 4, 2, 2, 0, 8, 1, 8, 1, hidden_size=32, intermediate_size=48,
                                   mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=5,
                                   tie_word_embeddings=True),
    "jamba-p8-x16-top2-mha": jamba(8, 8, 4, 4, 3, 16, 2, 4, 4, hidden_size=32, intermediate_size=32,
                                   mamba_d_state=16, mamba_d_conv=2, mamba_expand=1, mamba_conv_bias=False,
                                   mamba_proj_bias=True),
}

FAMILIES = {"llama": LLAMA, "mamba": MAMBA, "jamba": JAMBA}
ALL = {name: cfg for family in FAMILIES.values() for name, cfg in family.items()}
FAMILY = {name: family for family, cfgs in FAMILIES.items() for name in cfgs}
