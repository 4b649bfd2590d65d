"""Tiny models built at test time with transformers (the oracle), cached under tests/.cache/.

build_tiny("MistralForCausalLM", dict(...)) saves a random model with save_pretrained, plus a small
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a ChatML template), and returns
the folder. The folder name hashes the class, config and seed, so a changed config rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("MAMBA_CLI_TEST_CACHE", Path(__file__).parent / ".cache"))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. State space models keep a constant-size state.",
    "Zażółć gęślą jaźń. Dzień dobry, jak się masz? Łódź i Kraków leżą w Polsce.",
    "سلام دنیا. حال شما چطور است؟ این یک آزمایش است.",
    "def forward(self, x):\n    return self.norm(x + self.mixer(x))\n",
    "Mamba, Mistral and Jamba run on the CPU or a CUDA GPU. 1234567890 !?.,;:",
]


def tiny_tokenizer_files(folder: Path, vocab_size: int) -> None:
    """A character BPE (metaspace, like SentencePiece) with <unk>, <s>, </s>, <|im_start|>, <|im_end|>.

    Every token decodes to whole characters, so random models still produce valid text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= vocab_size, "vocab_size too small for the corpus alphabet"
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": CHATML,
    }))


def build_tiny(cls_name: str, config: dict, seed: int = 0, vocab_size: int = 320) -> Path:
    """Save a random transformers model of class cls_name; return its folder (cached)."""
    key = json.dumps([cls_name, config, seed, vocab_size], sort_keys=True)
    folder = CACHE / f"{cls_name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "done").exists():
        return folder
    import torch
    import transformers

    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=vocab_size, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # random init is tiny-variance; widen it so logits are informative
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 * 4)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tiny_tokenizer_files(tmp, vocab_size)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    (folder / "done").write_text("ok")
    return folder


def hf_model(folder: Path):
    """The transformers oracle for a tiny folder, fp32, eval mode."""
    import torch
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()
