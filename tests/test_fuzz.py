"""Bounded fuzzing of the weight readers: valid GGUF and safetensors files, mutated (byte flips,
truncation, insertions, length / count / offset fields set to edge values, header JSON rewritten),
must either load or raise ModelFormatError; never another exception, never a hang.

Deterministic (derandomized) and bounded: 200 examples a test, well under a minute in all."""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant.formats import GGMLType, quantize
from runtime.errors import ModelFormatError
from runtime.weights import _check_safetensors_header, iter_safetensors, read_gguf
from tests.fixtures import calls_bounded

# No deadline (a clock on a shared machine decides nothing); "never a hang" is a bound on work instead:
# each load may make at most WORK_FLOOR + WORK_PER_BYTE Python calls per byte of its file (calls_bounded).
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
WORK_FLOOR, WORK_PER_BYTE = 20_000, 4
EDGE_U64 = [0, 1, 7, 31, 32, 255, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
EDGE_U32 = [0, 1, 3, 4, 5, 8, 9, 12, 13, 14, 43, 63, 64, 2**31, 2**32 - 1]
_DIR = Path(tempfile.mkdtemp(prefix="mamba-cli-fuzz-"))


@functools.cache
def valid_gguf() -> tuple[bytes, int]:
    """A small valid GGUF (metadata of several types, F32 / F16 / Q4_0 / Q4_K / Q6_K tensors) and the
    offset where its data section starts."""
    path = _DIR / "valid.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint32("llama.context_length", 64)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    w.add_bool("flag", True)
    g = torch.Generator().manual_seed(0)
    w.add_tensor("norm", torch.randn(8, generator=g).numpy())
    w.add_tensor("half", torch.randn(2, 8, generator=g).half().numpy())
    for name, t in (("q4_0", GGMLType.Q4_0), ("q4_k", GGMLType.Q4_K), ("q6_k", GGMLType.Q6_K)):
        blocks = quantize(torch.randn(2, 256, generator=g), t).numpy()
        w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType(int(t)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes(), read_gguf(path).data_offset


@functools.cache
def valid_safetensors() -> bytes:
    from safetensors.torch import save_file

    path = _DIR / "valid.safetensors"
    save_file({"a": torch.randn(4, 8), "b": torch.arange(3), "c": torch.ones(2, 2, dtype=torch.bfloat16)},
              str(path), metadata={"format": "pt"})
    return path.read_bytes()


def mutations(size_hint: int) -> st.SearchStrategy:
    pos = st.integers(0, size_hint)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 255)),
        st.tuples(st.just("u64"), pos, st.sampled_from(EDGE_U64)),
        st.tuples(st.just("u32"), pos, st.sampled_from(EDGE_U32)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
    ), min_size=1, max_size=4)


def mutate(blob: bytes, ops: list) -> bytes:
    b = bytearray(blob)
    for op, at, arg in ops:
        at = min(at, len(b))
        if op == "flip" and at < len(b):
            b[at] = arg
        elif op == "u64":
            b[at:at + 8] = struct.pack("<Q", arg)
        elif op == "u32":
            b[at:at + 4] = struct.pack("<I", arg)
        elif op == "insert":
            b[at:at] = arg
        elif op == "delete":
            del b[at:at + arg]
        elif op == "truncate":
            del b[at:]
    return bytes(b)


def load_gguf(blob: bytes) -> None:
    path = _DIR / "case.gguf"
    path.write_bytes(blob)
    try:
        with calls_bounded(WORK_FLOOR + WORK_PER_BYTE * len(blob)):
            g = read_gguf(path)
            assert g.architecture
            for name in g.tensors:
                g.tensor(name)
    except ModelFormatError:
        pass


def load_safetensors(blob: bytes) -> None:
    path = _DIR / "case.safetensors"
    path.write_bytes(blob)
    for check in (lambda: _check_safetensors_header(path), lambda: list(iter_safetensors([path]))):
        try:
            with calls_bounded(WORK_FLOOR + WORK_PER_BYTE * len(blob)):
                check()
        except ModelFormatError:
            pass


@FUZZ
@given(ops=mutations(1024))
def test_fuzz_gguf_header(ops: list) -> None:
    """Mutations aimed at the header (the first data_offset bytes hold every length and count)."""
    blob, data_offset = valid_gguf()
    load_gguf(mutate(blob, [(op, at % data_offset, arg) for op, at, arg in ops]))


@FUZZ
@given(ops=mutations(1 << 16))
def test_fuzz_gguf_anywhere(ops: list) -> None:
    blob, _ = valid_gguf()
    load_gguf(mutate(blob, [(op, at % (len(blob) + 1), arg) for op, at, arg in ops]))


@FUZZ
@given(ops=mutations(1 << 12))
def test_fuzz_safetensors_bytes(ops: list) -> None:
    blob = valid_safetensors()
    load_safetensors(mutate(blob, [(op, at % (len(blob) + 1), arg) for op, at, arg in ops]))


NUMBERS = st.one_of(st.integers(-(2**70), 2**70),
                    st.sampled_from([float("inf"), float("nan"), -0.0, 1e300, 2.5]))
ANY = st.one_of(NUMBERS, st.text(max_size=8), st.none(), st.booleans(), st.lists(NUMBERS, max_size=4),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = {"data_offsets": st.one_of(st.lists(NUMBERS, min_size=2, max_size=2), ANY),
          "shape": st.one_of(st.lists(NUMBERS, max_size=4), ANY),
          "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "F8_E4M3", "BOOL", "XX", ""]), ANY)}
EDITS = st.one_of(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(FIELDS))).flatmap(
        lambda ef: st.tuples(st.just(ef[0]), st.just(ef[1]), FIELDS[ef[1]])),
    st.tuples(st.sampled_from(["a", "__metadata__", "new"]), st.none(), ANY),
    st.tuples(st.just("deep"), st.none(), st.integers(1, 5000)),  # [[[...]]] nested that deep
)


@FUZZ
@given(edits=st.lists(EDITS, min_size=1, max_size=3), length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
def test_fuzz_safetensors_header_json(edits: list, length_delta: int) -> None:
    """Rewrite entries of the JSON header: huge, negative, non-finite or mistyped values, deep nesting,
    a length prefix that disagrees with the header."""
    blob = valid_safetensors()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    deep = 0
    for entry, field, value in edits:
        if entry == "deep":
            deep = value
        elif field is None:
            header[entry] = value
        elif isinstance(header[entry], dict):
            header[entry][field] = value
    text = json.dumps(header).encode()
    if deep:
        text = text[:-1] + b', "deep": ' + b"[" * deep + b"]" * deep + b"}"
    prefix = struct.pack("<Q", max(0, len(text) + length_delta))
    load_safetensors(prefix + text + blob[8 + n:])


def test_fuzz_inputs_are_valid_to_start_with() -> None:
    """The fuzz targets load when unmutated (else the fuzzing would test nothing)."""
    blob, _ = valid_gguf()
    path = _DIR / "ok.gguf"
    path.write_bytes(blob)
    g = read_gguf(path)
    assert np.array_equal(g.tensor("norm").shape, (8,)) and len(g.tensors) == 5
    path = _DIR / "ok.safetensors"
    path.write_bytes(valid_safetensors())
    assert [n for n, _ in iter_safetensors([path])] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# chat templates: random compositions of jinja fragments, including hostile ones

TEMPLATE_PARTS = [
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{{ bos_token }}", "{% if add_generation_prompt %}assistant:{% endif %}", "{{ raise_exception('no') }}",
    "{{ ''.__class__ }}", "{{ messages.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
    "{% for i in range(10**9) %}x{% endfor %}", "{{ 'a' * 10**9 }}", "{{ 'x'.center(10**9) }}",
    "{% set l = [] %}{% for i in range(10**6) %}{% set _ = l.append(i) %}{% endfor %}",
    "{{ messages|tojson }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ 9**9**9 }}",
    "{% for", "}}", "{{ m.content.upper() }}", "{{ strftime_now('%Y') }}", "{{ x.y.z }}",
    "{% set ns = namespace(a=1) %}{{ ns.a }}", "{{ (messages|length) / 0 }}",
]


@FUZZ
@given(parts=st.lists(st.sampled_from(TEMPLATE_PARTS), min_size=1, max_size=4),
       text=st.text(max_size=40))
def test_fuzz_chat_templates(parts: list[str], text: str) -> None:
    from runtime.chat import ChatTemplateError, run_template

    context = {"messages": [{"role": "user", "content": text}], "add_generation_prompt": True,
               "bos_token": "<s>", "eos_token": "</s>"}
    try:
        out = run_template("".join(parts), context, seconds=0.5, max_chars=100_000)
    except ChatTemplateError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(out, str) and len(out) <= 100_000
