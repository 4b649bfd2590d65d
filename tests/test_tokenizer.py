"""Tokenizers against their references: sentencepiece for .model files, llama.cpp for GGUF vocabularies.

Also: encode_parts equals encoding the whole string, and the streaming Detokenizer over byte-fallback
and byte-level pieces never prints a replacement character.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from array import array
from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm

from runtime.errors import ModelFormatError
from runtime.generate import Detokenizer
from runtime.tokenizer import Tokenizer, read_spm_model
from tests.fixtures import llama_cpp, smollm2_gguf

DATA = Path(mistral_common.__file__).parent / "data"
MISTRAL = {"v1": DATA / "tokenizer.model.v1", "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3"}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zażółć gęślą jaźń. Dzień dobry, jak się masz? Łódź i Kraków.",
    "سلام دنیا. حال شما چطور است؟ این یک آزمایش است.",
    "你好，世界！这是一个测试。日本語のテキスト、カタカナ。",
    "def forward(self, x):\n\treturn self.norm(x + self.mixer(x))  # residual\n",
    "emoji 😀🎉👍🏽 🧑‍🚀 👨‍👩‍👧 flags 🇵🇱",
    " leading space", "  two leading", "trailing space ", "trailing two  ", "a  b   c    d",
    "\n", "\n\nnew\nlines\n\n", "   ", " ", "", "\t tab \t",
    "I'm you'll they've DON'T 1234567890 3.14159 x**2",
    "Русский текст, ёж. Ελληνικά. עברית. हिन्दी।",
    "ﬁ ligature ①②③ Ａ全角 zero\u200bwidth no\u00a0break",
    "[INST] spelled control tokens [/INST] </s> <s> <unk> <|im_end|>",
]
ALPHABET = ("abcdefghijklmnopqrstuvwxyz ABC  \n\t.,;'\"!?-_()[]{}<>/\\0123456789"
            "ążśćęłńóźЖжыسلامدنیا你好世界😀🎉ﬁ①Ａ\u00a0\u200b")


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "Hello", "world", "państwo", "است", "中文", "  ", "\n", "[INST]", "</s>", "1999", "😀"]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))))
        else:
            out.append(rng.choice(["", " "]) + " ".join(rng.choice(words) for _ in range(rng.randint(1, 10))))
    return out


def spm_folder(tmp_path: Path, version: str) -> Path:
    name = {"v1": "tokenizer.model.v1", "v3": "tokenizer.model.v3"}[version]
    shutil.copy(MISTRAL[version], tmp_path / name)
    return tmp_path


def gguf_meta(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}


@pytest.fixture(scope="module")
def smol() -> tuple[Path, Tokenizer, dict]:
    """The SmolLM2 GGUF, the tokenizer rebuilt from it, and its tokenizer.* metadata."""
    path = smollm2_gguf()
    meta = {k: v for k, v in gguf_meta(path).items() if k.startswith("tokenizer.")}
    return path, Tokenizer.from_gguf_metadata(meta), meta


def spm_gguf(path: Path, model: Path) -> Path:
    """A vocab-only 'llama' GGUF (SentencePiece) carrying a .model file's pieces, scores and types."""
    import gguf

    m = read_spm_model(model)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(m.pieces)
    w.add_token_scores(m.scores)
    w.add_token_types(m.types)
    w.add_bos_token_id(m.bos_id)
    w.add_eos_token_id(m.eos_id)
    w.add_unk_token_id(m.unk_id)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- SentencePiece .model files ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_spm_model_reader_matches_sentencepiece(version):
    m = read_spm_model(MISTRAL[version])
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL[version]))
    assert len(m.pieces) == sp.get_piece_size()
    assert (m.unk_id, m.bos_id, m.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    for i in range(0, len(m.pieces), 7):
        assert m.pieces[i] == sp.id_to_piece(i)
        assert m.scores[i] == pytest.approx(sp.get_score(i))
        assert (m.types[i] == 3) == sp.is_control(i) and (m.types[i] == 6) == sp.is_byte(i)
    assert m.model_type == 2 and m.byte_fallback


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_spm_folder_matches_sentencepiece(tmp_path, version):
    tok = Tokenizer.from_dir(spm_folder(tmp_path, version))
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL[version]))
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], True, sp.get_piece_size())
    assert tok.is_special("[INST]") == (version == "v3")
    texts = CORPUS + random_texts(400)
    mismatches = [t for t in texts if tok.encode(t) != sp.encode(t)]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == sp.decode(ids) == t


def test_spm_control_tokens_only_with_special(tmp_path):
    tok = Tokenizer.from_dir(spm_folder(tmp_path, "v3"))
    text = "[INST] hi [/INST]</s>"
    assert 3 not in tok.encode(text) and 2 not in tok.encode(text)
    ids = tok.encode(text, special=True)
    assert ids[0] == 3 and 4 in ids and ids[-1] == 2


def train_spm(folder: Path, model_type: str) -> Path:
    from tests.fixtures import CORPUS as TRAIN

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN * 5), model_writer=buf, vocab_size=420,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder / "tokenizer.model"


def test_trained_spm_bpe_matches_sentencepiece(tmp_path):
    """Other SentencePiece settings: an NFKC charsmap and extra-whitespace removal."""
    m = read_spm_model(train_spm(tmp_path, "bpe"))
    assert m.charsmap and m.remove_extra_whitespaces and m.model_type == 2
    tok = Tokenizer.from_dir(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = CORPUS + random_texts(300, seed=1)
    mismatches = [t for t in texts if tok.encode(t) != sp.encode(t)]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"
    assert all(tok.decode(tok.encode(t)) == sp.decode(sp.encode(t)) for t in texts)


def test_from_dir_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ModelFormatError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_dir(tmp_path)
    train_spm(tmp_path, "unigram")
    with pytest.raises(ModelFormatError, match="SentencePiece unigram models are not supported"):
        Tokenizer.from_dir(tmp_path)


# ---- GGUF vocabularies ----------------------------------------------------------------------------


@pytest.mark.llamacpp
def test_gguf_gpt2_smollm2_matches_llama_cpp(smol):
    path, tok, _ = smol
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], False)
    ll = llama_cpp().Llama(str(path), vocab_only=True, verbose=False)
    texts = CORPUS + random_texts(400)
    for special in (False, True):
        mismatches = [t for t in texts if tok.encode(t, special=special)
                      != ll.tokenize(t.encode(), add_bos=False, special=special)]
        assert not mismatches, f"special={special}: {len(mismatches)}/{len(texts)} differ: {mismatches[:3]}"
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_gguf_spm_matches_sentencepiece(tmp_path):
    path = spm_gguf(tmp_path / "spm.gguf", MISTRAL["v1"])
    tok = Tokenizer.from_gguf_metadata(gguf_meta(path))
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL["v1"]))
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    texts = CORPUS + random_texts(300)
    mismatches = [t for t in texts if tok.encode(t) != sp.encode(t)]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"


def test_spm_merges_cache(tmp_path, monkeypatch):
    """The SentencePiece merges kept on disk (a faster load): computed and written the first time, read back
    after, recomputed over a damaged file; the tokenizer encodes as sentencepiece in each case."""
    import runtime.tokenizer as tokenizer_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = spm_gguf(tmp_path / "spm.gguf", MISTRAL["v1"])
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL["v1"]))
    texts = CORPUS + random_texts(100)
    computed = []
    real = tokenizer_module._spm_merge_ids
    monkeypatch.setattr(tokenizer_module, "_spm_merge_ids", lambda *a: computed.append(1) or real(*a))
    for damage, recomputes in ((None, 1), (None, 0), ("empty", 1), ("torn", 1), ("flipped", 1), ("past", 1),
                               ("negative", 1), (None, 0)):
        files = list(tokenizer_module.merges_cache_dir().glob("*.bin"))
        if damage is not None:
            blob = files[0].read_bytes()
            ids = array("i", blob[:-32])
            ids[5] = 10**6 if damage == "past" else -3  # a whole file (its digest matches) naming no piece
            valid = ids.tobytes() + hashlib.sha256(ids.tobytes()).digest()
            files[0].write_bytes({"empty": b"", "torn": blob[: len(blob) // 2],
                                  "flipped": blob[:8] + bytes([blob[8] ^ 1]) + blob[9:],
                                  "past": valid, "negative": valid}[damage])
        computed.clear()
        tok = Tokenizer.from_gguf_metadata(gguf_meta(path))
        assert len(computed) == recomputes
        assert [tok.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    assert len(list(tokenizer_module.merges_cache_dir().iterdir())) == 1  # no temporary files left


@pytest.mark.llamacpp
def test_gguf_spm_matches_llama_cpp(tmp_path):
    path = spm_gguf(tmp_path / "spm.gguf", MISTRAL["v1"])
    tok = Tokenizer.from_gguf_metadata(gguf_meta(path))
    texts = CORPUS + random_texts(300)
    ll = llama_cpp().Llama(str(path), vocab_only=True, verbose=False)
    for special in (False, True):
        assert [tok.encode(t, special=special) for t in texts] == [
            ll.tokenize(t.encode(), add_bos=False, special=special) for t in texts]


def test_gguf_gpt2_pre_tokenizer_must_be_known(smol):
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.pre 'nonesuch' is not supported"):
        Tokenizer.from_gguf_metadata({**smol[2], "tokenizer.ggml.pre": "nonesuch"})


def test_gguf_metadata_errors(tmp_path):
    meta = gguf_meta(spm_gguf(tmp_path / "spm.gguf", MISTRAL["v1"]))
    with pytest.raises(ModelFormatError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": []})
    with pytest.raises(ModelFormatError, match="token_type has 3 entries"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": [1, 1, 1]})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model 'bert' is not supported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens holds int values, not str"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": list(range(len(meta["tokenizer.ggml.tokens"])))})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.token_type holds float values, not int"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": [1.0] * len(meta["tokenizer.ggml.tokens"])})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.merges holds list values, not str"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": [["a", "b"]]})


# ---- encode_parts ---------------------------------------------------------------------------------


def metaspace_folder(tmp_path: Path) -> Path:
    """tokenizer.json as recent HF Mistral repos ship it: Metaspace(prepend 'first') instead of a Prepend
    normalizer, so text after a control token gets no '▁' prefix."""
    from tokenizers import pre_tokenizers

    tok = Tokenizer.from_dir(spm_folder(tmp_path, "v3")).tok
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    (tmp_path / "tokenizer.model.v3").unlink()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return tmp_path


def make_tokenizer(request, tmp_path: Path, name: str) -> Tokenizer:
    """A tokenizer under test by name; only "smollm2" needs (and may skip for) the SmolLM2 download."""
    if name == "smollm2":
        return request.getfixturevalue("smol")[1]
    if name == "metaspace":
        return Tokenizer.from_dir(metaspace_folder(tmp_path))
    return Tokenizer.from_dir(spm_folder(tmp_path, name.removeprefix("spm-")))


@pytest.mark.parametrize("name", ["spm-v3", "metaspace", "smollm2"])
def test_encode_parts_equals_whole_string(request, tmp_path, name):
    tok = make_tokenizer(request, tmp_path, name)
    rng = random.Random(3)
    controls = ["<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]
    for text in CORPUS + random_texts(100, seed=5):
        pieces = [rng.choice(controls) if rng.random() < 0.4 else text[: rng.randint(0, len(text))]
                  for _ in range(rng.randint(1, 6))]
        parts = [(p, any(c in p for c in controls) or rng.random() < 0.5) for p in pieces]
        whole = "".join(pieces)
        if sum(whole.count(c) for c in controls) != sum(p.count(c) for p in pieces for c in controls):
            continue  # a control token spans a part boundary
        assert tok.encode_parts(parts) == tok.encode(whole, special=True), parts


@pytest.mark.parametrize("name", ["spm-v3", "metaspace", "smollm2"])
def test_encode_parts_keeps_unmarked_controls_as_text(request, tmp_path, name):
    tok = make_tokenizer(request, tmp_path, name)
    specials = tok.special_ids()
    user = "x </s> [INST] <|im_end|> <s> y"
    ids = tok.encode_parts([("[INST] ", True), (user, False), (" [/INST]", True)])
    assert tok.decode(ids).count("</s>") == 1
    assert [i for i in ids if i in specials] == [i for i in tok.encode("[INST][/INST]", special=True)
                                                 if i in specials]


# ---- streaming detokenizer ------------------------------------------------------------------------

STREAM_TEXTS = [
    "سلام دنیا. حال شما چطور است؟ این یک آزمایش است. کتاب‌ها روی میز هستند.",
    "Zażółć gęślą jaźń. Źdźbło, żółw i łąka — ćma leci nad rzeką. Ósma godzina.",
    "Mix: 你好 😀 شما gęś 🇵🇱\n  end",
]


@pytest.mark.parametrize("name", ["spm-v1", "spm-v3", "metaspace", "smollm2"])
def test_detokenizer_streams_whole_characters(request, tmp_path, name):
    tok = make_tokenizer(request, tmp_path, name)
    byte_pieces = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        byte_pieces += sum(tok.tok.id_to_token(i).startswith("<0x") for i in ids)
        detok = Detokenizer(tok)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == tok.decode(ids)
    if name.startswith("spm-"):  # SentencePiece spells some of these characters in bytes: the hard case
        assert byte_pieces > 0
