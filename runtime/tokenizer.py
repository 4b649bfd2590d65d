"""Tokenizers, backed by the `tokenizers` library: from tokenizer.json (+ tokenizer_config.json).

    Tokenizer.encode(text)                 text -> ids; control-token spellings stay plain text
    Tokenizer.encode(text, special=True)   the same, but '<s>', '[INST]', ... become control tokens
    Tokenizer.decode(ids)                  ids -> text
    bos_id / eos_ids / add_bos             what a prompt starts with and where generation stops
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from runtime.errors import ModelFormatError


def _token_str(x: Any) -> str | None:
    if isinstance(x, dict):
        return x.get("content")
    return x


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool | None = None, chat_template: str | None = None):
        self.tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.eos_ids: list[int] = [eos_id] if eos_id is not None else []
        if add_bos is None:
            # Infer from the post-processor: does encoding with special tokens prepend BOS?
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = bool(with_special) and self.bos_id is not None and with_special[0] == self.bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
        template = cfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tok, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   cfg.get("add_bos_token"), template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

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

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)
