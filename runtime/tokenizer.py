"""Tokenizers, backed by the `tokenizers` library, from any of the three places a model keeps one.

    Tokenizer.from_dir(folder)            tokenizer.json (+ tokenizer_config.json), or a SentencePiece
                                          tokenizer.model / tokenizer.model.v3 / .v1 (mistral-inference)
    Tokenizer.from_gguf_metadata(meta)    rebuilt from GGUF tokenizer.ggml.* keys: 'llama' (SentencePiece
                                          BPE, as llama.cpp's SPM tokenizer) or 'gpt2' (byte-level BPE with
                                          llama.cpp's pre-tokenizer regexes per tokenizer.ggml.pre)

    Tokenizer.encode(text)                 text -> ids; control-token spellings stay plain text
    Tokenizer.encode(text, special=True)   the same, but '<s>', '[INST]', ... become control tokens
    Tokenizer.encode_parts(parts)          [(text, special_allowed)] -> ids, as if encoded as one string
    Tokenizer.decode(ids)                  ids -> text
    bos_id / eos_ids / add_bos             what a prompt starts with and where generation stops

A SentencePiece model is read with a small protobuf reader below (no protobuf dependency) and turned
into a `tokenizers` BPE (merges ordered by the score of the piece they make, byte fallback) whose
normalizer reproduces SentencePiece's: charsmap, extra-whitespace removal, the '▁' dummy prefix on
every text section, spaces escaped to '▁'. Unigram models are refused: a `tokenizers` Unigram lattice
would match control and byte pieces inside plain text, which SentencePiece never does.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from runtime.errors import ModelFormatError

SPM_FILES = ("tokenizer.model.v3", "tokenizer.model.v1", "tokenizer.model")
SPACE = "\u2581"  # '▁', SentencePiece's escaped space
# SentencePiece piece types (sentencepiece_model.proto; also GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Marks the start of a text section that follows a control token (see encode_parts); private use area.
_ANCHOR = "\ue000\U000f0000mamba-cli\U000f0000\ue000"


def _token_str(x: Any) -> str | None:
    if isinstance(x, dict):
        return x.get("content")
    return x


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool | None = None, chat_template: str | None = None,
                 eos_ids: list[int] | None = None):
        self.tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.eos_ids: list[int] = [eos_id] if eos_id is not None else []
        self.eos_ids += [i for i in eos_ids or [] if i not in self.eos_ids]
        if add_bos is None:
            # Infer from the post-processor: does encoding with special tokens prepend BOS?
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = bool(with_special) and self.bos_id is not None and with_special[0] == self.bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._anchored: tuple[HFTokenizer, int] | None = None

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        spm = next((folder / n for n in SPM_FILES if (folder / n).is_file()), None)
        if path.is_file():
            try:
                tok = HFTokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers library raises plain Exceptions
                raise ModelFormatError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
            defaults: dict[str, Any] = {}
        elif spm is not None:
            proto = read_spm_model(spm)
            tok = spm_tokenizer(proto)
            defaults = {"bos_token": proto.piece_at(proto.bos_id), "eos_token": proto.piece_at(proto.eos_id),
                        "add_bos_token": True}
        else:
            raise ModelFormatError(f"{folder}: no tokenizer.json or tokenizer.model(.v3/.v1)")
        cfg = defaults | _read_tokenizer_config(folder)
        template = cfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tok, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   cfg.get("add_bos_token"), template)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], where: str = "GGUF") -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (tokenizer.ggml.* keys -> python values)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ModelFormatError(f"{where}: no tokenizer.ggml.tokens; cannot rebuild the tokenizer")
        _check_array(tokens, str, "tokens", where)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        _check_array(types, int, "token_type", where)
        if len(types) != len(tokens):
            raise ModelFormatError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                                   f"{len(tokens)} tokens")
        if kind == "llama":
            scores = list(meta.get("tokenizer.ggml.scores") or [])
            if len(scores) != len(tokens):
                raise ModelFormatError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for "
                                       f"{len(tokens)} tokens")
            unk = meta.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else 0)
            proto = SpmModel(tokens, [float(s) for s in scores], types,
                             model_type=2, byte_fallback=BYTE in types, unk_id=int(unk),
                             add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                             remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces",
                                                                    False)))
            tok, add_bos_default = spm_tokenizer(proto), True
        elif kind == "gpt2":
            merges = meta.get("tokenizer.ggml.merges")
            if not isinstance(merges, list):
                raise ModelFormatError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
            _check_array(merges, str, "merges", where)
            tok = _gpt2_tokenizer(tokens, types, merges, str(meta.get("tokenizer.ggml.pre") or "default"), where)
            add_bos_default = False
        else:
            raise ModelFormatError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")

        def name(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if isinstance(meta.get(k), int) and 0 <= meta[k] < len(tokens)]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        return cls(tok, name("bos"), name("eos"), add_bos, meta.get("tokenizer.chat_template"), extra_eos)

    # ---- queries --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def is_special(self, token: str) -> bool:
        """Is `token` a control token (one that encode(text, special=True) turns into its id)?"""
        return any(t.content == token and t.special for t in self.tok.get_added_tokens_decoder().values())

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, special: bool = False) -> list[int]:
        self.tok.encode_special_tokens = not special
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt: BOS (when the model expects one) + the text."""
        ids = self.encode(text)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Encode the concatenation of parts; control tokens are recognized only in parts marked True.

        When no control token spans a part boundary, the result equals encode("".join(texts), special=True)
        with the unmarked parts' control-token spellings kept as text: the text between two control tokens
        is encoded as one section, as the tokenizer would encode it inside the whole string.
        """
        pieces: list[tuple[str, int | None]] = []  # (text, None) or ("", control id)
        for text, special in parts:
            if not text:
                continue
            if not special:
                pieces.append((text, None))
                continue
            enc = self.tok.encode(text, add_special_tokens=False)
            controls = self.special_ids()
            pos = 0
            for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True):
                if tid in controls:
                    pieces += [(text[pos:start], None), ("", tid)]
                    pos = end
            pieces.append((text[pos:], None))
        ids: list[int] = []
        run, after_control = "", False
        for text, tid in pieces + [("", -1)]:
            if tid is None:
                run += text
                continue
            if run:
                ids += self._encode_section(run, after_control)
            if tid >= 0:
                ids.append(tid)
            run, after_control = "", True
        return ids

    def special_ids(self) -> set[int]:
        """Ids of the control tokens."""
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def _encode_section(self, text: str, after_control: bool) -> list[int]:
        """Text without control tokens, encoded as at the string's start or right after a control token."""
        if not after_control or _ANCHOR in text:
            return self.encode(text)
        if self._anchored is None:
            # A copy with one extra non-special added token: `anchor + text` puts text in a section that
            # follows an added token (prefix-space rules of Metaspace 'first' etc. apply as after [INST]).
            clone = HFTokenizer.from_str(self.tok.to_str())
            clone.add_tokens([AddedToken(_ANCHOR, normalized=False, special=False)])
            self._anchored = (clone, clone.token_to_id(_ANCHOR))
        clone, anchor = self._anchored
        clone.encode_special_tokens = True
        ids = clone.encode(_ANCHOR + text, add_special_tokens=False).ids
        assert ids and ids[0] == anchor
        return ids[1:]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: expected a JSON object")
    return {k: v for k, v in cfg.items() if v is not None}


# ---- SentencePiece model files ---------------------------------------------------------------------


@dataclass
class SpmModel:
    """What a SentencePiece ModelProto says about tokenizing (sentencepiece_model.proto field numbers)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1  # TrainerSpec.model_type (3): 1 UNIGRAM, 2 BPE (the one supported)
    byte_fallback: bool = False  # TrainerSpec.byte_fallback (35)
    unk_id: int = 0  # TrainerSpec.unk_id (40)
    bos_id: int = 1  # (41)
    eos_id: int = 2  # (42)
    add_dummy_prefix: bool = True  # NormalizerSpec.add_dummy_prefix (3)
    remove_extra_whitespaces: bool = True  # (4)
    escape_whitespaces: bool = True  # (5)
    charsmap: bytes = field(default=b"", repr=False)  # NormalizerSpec.precompiled_charsmap (2)

    def piece_at(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message level: [(field number, int value or bytes)]."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            val, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((num, val))
    return out


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_NORMALIZER_FLAGS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def read_spm_model(path: Path) -> SpmModel:
    """Parse a SentencePiece .model file (a serialized ModelProto)."""
    try:
        top = _fields(Path(path).read_bytes())
        m = SpmModel([], [], [])
        for num, val in top:
            if num == 1 and isinstance(val, bytes):  # SentencePiece {piece=1, score=2, type=3}
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(val):
                    if n == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif n == 2 and isinstance(v, int):
                        score = struct.unpack("<f", struct.pack("<I", v))[0]
                    elif n == 3 and isinstance(v, int):
                        kind = v
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(kind)
            elif num == 2 and isinstance(val, bytes):  # TrainerSpec
                for n, v in _fields(val):
                    if isinstance(v, int):
                        if n == 3:
                            m.model_type = v
                        elif n == 35:
                            m.byte_fallback = bool(v)
                        elif n in (40, 41, 42):
                            setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id"}[n], _int32(v))
            elif num == 3 and isinstance(val, bytes):  # NormalizerSpec
                for n, v in _fields(val):
                    if n == 2 and isinstance(v, bytes):
                        m.charsmap = v
                    elif n in (3, 4, 5) and isinstance(v, int):
                        setattr(m, _NORMALIZER_FLAGS[n], bool(v))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not a SentencePiece model ({e})") from None
    if not m.pieces:
        raise ModelFormatError(f"{path}: not a SentencePiece model (no pieces)")
    if m.model_type != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(m.model_type, str(m.model_type))
        raise ModelFormatError(f"{path}: SentencePiece {kind} models are not supported (only bpe)")
    if not 0 <= m.unk_id < len(m.pieces):
        raise ModelFormatError(f"{path}: unk_id {m.unk_id} outside the {len(m.pieces)} pieces")
    return m


def _spm_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE: a merge ranks by the score of the piece it makes."""
    return [(pieces[a], pieces[b]) for a, b in _spm_merge_ids(pieces, scores, types)]


def _spm_merge_ids(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[int, int]]:
    """_spm_merges as the two halves' piece ids, in rank order."""
    vocab = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    # Only split points where both halves can be pieces: the lengths pieces have (a few dozen in real
    # vocabularies), so a hostile 300 KB piece costs a few slices, not 300k of them (was quadratic).
    lengths_set = {len(p) for p in vocab}
    lengths = sorted(lengths_set)
    found = []
    for piece, i in vocab.items():
        n = len(piece)
        for k in lengths:
            if k >= n:
                break
            if n - k not in lengths_set:
                continue
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, vocab[left], vocab[right]))
    found.sort()
    return [(a, b) for *_, a, b in found]


MERGES_CACHE_VERSION = b"spm-merges-2"


def merges_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mamba-cli" / "tokenizers"


def cached_spm_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """_spm_merges, kept on disk per vocabulary as pairs of piece ids and their sha256 (computing them is
    ~0.15-0.2 s of a small model's ~0.3 s load on 2 cores; reading them back ~0.02 s). Keyed by a hash of the
    pieces, scores and types; a missing, unreadable or damaged file is recomputed (and rewritten, atomically,
    when the folder is writable)."""
    h = hashlib.sha256(MERGES_CACHE_VERSION)
    h.update("\0".join(pieces).encode("utf-8", "surrogatepass"))
    h.update(array("d", scores).tobytes())
    h.update(array("q", types).tobytes())
    path = merges_cache_dir() / f"{h.hexdigest()[:40]}.bin"
    ids = None
    try:
        blob = path.read_bytes()
        payload, digest = blob[:-32], blob[-32:]
        if len(blob) >= 32 and hashlib.sha256(payload).digest() == digest:  # a damaged file is recomputed
            ids = array("i", payload)
    except (OSError, ValueError):
        pass
    # no negative id (numpy's min: builtins.min took 3 ms over a 32k vocabulary's 60k ids)
    if ids is not None and len(ids) % 2 == 0 and (not ids or np.frombuffer(ids, np.int32).min() >= 0):
        piece = pieces.__getitem__  # pairs of strings built in C (a list comprehension: ~35 vs ~17 ms for 59k)
        try:
            return list(zip(map(piece, ids[::2]), map(piece, ids[1::2]), strict=True))
        except IndexError:  # an id past this vocabulary: recomputed below
            pass
    pairs = _spm_merge_ids(pieces, scores, types)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = array("i", [i for pair in pairs for i in pair]).tobytes()
        tmp.write_bytes(payload + hashlib.sha256(payload).digest())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return [(pieces[a], pieces[b]) for a, b in pairs]


def spm_tokenizer(m: SpmModel) -> HFTokenizer:
    """A `tokenizers` Tokenizer that encodes and decodes as SentencePiece does with model m.

    One known difference: user-defined pieces (none in Mistral's vocabularies) split the raw text and
    the text after one gets its own '▁' prefix, as in llama.cpp; SentencePiece adds no prefix there."""
    tok = HFTokenizer(models.BPE(vocab=first_ids(m.pieces), merges=cached_spm_merges(m.pieces, m.scores, m.types),
                                 unk_token=m.pieces[m.unk_id], fuse_unk=True, byte_fallback=m.byte_fallback))
    steps: list[normalizers.Normalizer] = []
    if m.charsmap:
        steps.append(normalizers.Precompiled(m.charsmap))
    if m.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if m.add_dummy_prefix:
        steps.append(normalizers.Prepend(" " if not m.escape_whitespaces else SPACE))
    if m.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [decoders.Replace(SPACE, " ")]
    if m.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if m.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    _add_token_types(tok, m.pieces, m.types)
    return tok


# ---- GGUF byte-level BPE ---------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (regexes applied in turn, each isolating its matches; ignore_merges), as in
# llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe and the tokenizer_pre table).
GGUF_PRE: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default",), ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), False)),
    **dict.fromkeys(("gpt-2", "phi-2", "starcoder", "refact", "mpt", "olmo", "jais", "exaone4"),
                    ((_GPT2,), False)),
    **dict.fromkeys(("smollm", "command-r", "codeshell", "exaone", "minerva-7b"), ((r"\p{N}", _GPT2), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3,), True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ((_LLAMA3,), False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), ((_QWEN2,), False)),
}


def _gpt2_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str,
                    where: str) -> HFTokenizer:
    if pre not in GGUF_PRE:
        raise ModelFormatError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                               f"(known: {', '.join(sorted(GGUF_PRE))})")
    regexes, ignore_merges = GGUF_PRE[pre]
    vocab = first_ids(tokens)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelFormatError(f"{where}: malformed tokenizer.ggml.merges entry {m!r}")
        pairs.append((left, right))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _add_token_types(tok, tokens, types)
    return tok


def _check_array(values: Any, kind: type, key: str, where: str) -> None:
    """tokenizer.ggml.<key> is a list of `kind` (a GGUF array has one element type: its first tells)."""
    if not isinstance(values, list) or values and (not isinstance(values[0], kind) or isinstance(values[0], bool)):
        what = type(values[0]).__name__ if isinstance(values, list) else type(values).__name__
        raise ModelFormatError(f"{where}: tokenizer.ggml.{key} holds {what} values, not {kind.__name__}")


def first_ids(pieces: list[str]) -> dict[str, int]:
    """piece -> its first id (a repeated piece keeps the first): the later pairs of the reversed list win."""
    return dict(zip(reversed(pieces), range(len(pieces) - 1, -1, -1), strict=True))


def _add_token_types(tok: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown pieces become special added tokens; user-defined ones plain added tokens
    (matched in any text, as SentencePiece and llama.cpp match them)."""
    if len(tokens) != len(types):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    others = [(i, types[i]) for i in compress(range(len(types)), map(NORMAL.__ne__, types))]  # few; found in C
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i, k in others
                            if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i, k in others
                    if k == USER_DEFINED])
