"""`mamba-cli chat`: turns reuse the cache, /save + --resume continue with no re-prefill, bad files refused."""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from cli.chat import Chat
from cli.common import Sampling
from runtime import load_model
from runtime.errors import MambaCliError
from tests.fixtures import build_tiny

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mamba": ("MambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2)),
    "mistral": ("MistralForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, sliding_window=512)),
    "jamba": ("JambaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                       attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                       num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                                       mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False)),
}


def chat_for(name: str) -> Chat:
    m = load_model(build_tiny(*MODELS[name]), device="cpu")
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    return Chat(m, greedy, None, Console(file=open(os.devnull, "w")), verbose=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_conversation_resumes_identically(name, tmp_path):
    a = chat_for(name)
    a.reply("Hello there, how are you?")
    a.reply("Tell me about state space models.")
    path = tmp_path / "conv.safetensors"
    a.save(str(path))
    b = chat_for(name)
    b.load(str(path))
    # SSM states are saved where the last prompt ended (they cannot rewind past a reply that re-tokenizes)
    assert b.messages == a.messages and b.session.tokens == a.session.tokens[: len(b.session.tokens)]
    a.reply("And then?")
    b.reply("And then?")
    assert a.messages[-1] == b.messages[-1]
    assert a.session.tokens == b.session.tokens


def test_turns_prefill_only_new_tokens():
    from runtime.generate import Stats

    c = chat_for("mamba")
    c.reply("First question, quite a long one with many words in it.")
    cached = len(c.session.tokens)
    stats = Stats()
    from runtime.generate import stream_text

    c.messages.append({"role": "user", "content": "Second."})
    list(stream_text(c.m, c.ids(), stats=stats, session=c.session, max_new_tokens=2, temperature=0.0))
    assert stats.cached_tokens == cached
    assert stats.prompt_tokens == len(c.ids()) - cached


def count_tokens_in(m) -> list[int]:
    """From now on, the length of every token block m.forward is given (prefill chunks, decode steps)."""
    seen, forward = [], m.forward

    def counting(ids, *args, **kw):
        seen.append(ids.shape[1])
        return forward(ids, *args, **kw)

    m.forward = counting
    return seen


def test_ssm_state_file_size_and_resume_work_do_not_grow_with_history(tmp_path):
    c = chat_for("mamba")
    c.reply("short")
    c.save(str(tmp_path / "short.safetensors"))
    long_text = " ".join(["state space models keep a constant-size state"] * 60)
    for _ in range(4):
        c.reply(long_text)
    c.save(str(tmp_path / "long.safetensors"))
    assert len(c.session.tokens) > 1000
    sizes, fed = {}, {}
    for name in ("short", "long"):
        f = tmp_path / f"{name}.safetensors"
        d = chat_for("mamba")
        d.load(str(f))
        saved = len(d.session.tokens)
        sizes[name] = (f.stat().st_size, saved)
        tokens_in = count_tokens_in(d.m)
        d.reply("And the next question?")
        new_turn = len(d.ids()) - saved  # the new user turn + the reply, as the next prompt renders them
        fed[name] = sum(tokens_in)
        # resuming prefills the last reply and the new turn, then one token per step: none of the saved
        # history again
        assert 0 < fed[name] <= new_turn, (name, tokens_in, saved)
    # the state itself is the same size; the file only adds the token ids and messages as metadata
    tensor_bytes = {n: s[0] - 8 * s[1] for n, s in sizes.items()}
    assert tensor_bytes["long"] - tensor_bytes["short"] < 64 * 1024 + len(long_text) * 8
    assert sizes["long"][1] > 1000 > fed["long"]


def test_state_of_another_model_is_refused(tmp_path):
    a = chat_for("mamba")
    a.reply("hi")
    a.save(str(tmp_path / "s.safetensors"))
    b = chat_for("mistral")
    with pytest.raises(Exception, match="saved with another model|layers"):
        b.load(str(tmp_path / "s.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a state file at all")
    with pytest.raises(MambaCliError, match="junk.safetensors: not a readable state file"):
        b.load(str(tmp_path / "junk.safetensors"))


def run_chat(folder: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "chat", str(folder), "-t", "0", "-n", "8", "-v", *extra],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


def test_chat_command_end_to_end(tmp_path):
    folder = build_tiny(*MODELS["mamba"])
    state = tmp_path / "conv.safetensors"
    p = run_chat(folder, f'hello\n"""multi\nline"""\n/set temperature 0\n/save {state}\n/exit\n')
    assert p.returncode == 0, p.stderr
    prompts = [int(x) for x in re.findall(r"prompt: (\d+) new tokens", p.stdout)]
    cached = [int(x) for x in re.findall(r"\((\d+) cached\)", p.stdout)]
    assert len(prompts) == 2 and len(cached) == 1 and cached[0] > prompts[0]  # turn 1 + its reply reused
    assert state.exists()
    p2 = run_chat(folder, "again\n/exit\n", "--resume", str(state))
    assert p2.returncode == 0, p2.stderr
    assert "resumed 4 messages" in p2.stdout
    assert re.search(r"\((\d+) cached\)", p2.stdout), p2.stdout
    p3 = run_chat(folder, "/load /no/such/file\n/bogus\n/exit\n")
    assert p3.returncode == 0 and "no such file" in p3.stdout and "unknown command /bogus" in p3.stdout


@pytest.mark.parametrize("name", ["jamba", "mamba"])
def test_chat_command_on_ssm_and_hybrid_folders(name):
    """(`run` on these families is checked against transformers in tests/test_architectures.py.)"""
    folder = build_tiny(*MODELS[name])
    chat = subprocess.run([sys.executable, "-m", "cli", "chat", str(folder), "-t", "0", "-n", "6", "-v"],
                          input="hello\nagain\n/exit\n", capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert chat.returncode == 0, chat.stderr
    turns = re.findall(r"prompt: (\d+) new tokens(?: \((\d+) cached\))?", chat.stdout)
    assert len(turns) == 2 and turns[0][1] == ""
    assert int(turns[1][1]) >= int(turns[0][0])  # turn 2 reused at least turn 1's whole prompt


class Output:
    """A child's stdout, read as it arrives by a thread, so that a test waits for what the child printed
    (the model loaded, tokens streaming) instead of sleeping and hoping it got there."""

    # A hang guard, not a speed check: loading a tiny model and streaming the first tokens takes 2-8 s
    # on two busy cores (measured); a child that prints nothing for this long is stuck.
    LIMIT_S = 180

    def __init__(self, pipe) -> None:
        self.text = ""
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 4096), b""):
            self.text += self._decode(chunk)

    def wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.LIMIT_S
        while not ready(self.text):
            assert time.monotonic() < deadline, f"no {what} after {self.LIMIT_S} s: {self.text[-300:]!r}"
            time.sleep(0.02)

    def close(self) -> str:
        self._thread.join(60)
        return self.text


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    folder = build_tiny(*MODELS["mamba"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "cli", "chat", str(folder), "-t", "0", "-n", "100000", "-v",
                          "--ignore-eos"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    out = Output(p.stdout)
    out.wait_for(lambda t: t.count(">>> ") == 1, "input prompt")  # loaded, reading stdin
    p.stdin.write(b"tell me everything\n")
    p.stdin.flush()
    out.wait_for(lambda t: len(t.split(">>> ", 1)[1]) > 200, "streamed reply")
    p.send_signal(signal.SIGINT)
    out.wait_for(lambda t: t.count(">>> ") == 2, "second input prompt")
    p.stdin.write(b"and then?\n")  # the conversation goes on: a second turn, interrupted as well
    p.stdin.flush()
    out.wait_for(lambda t: len(t.split(">>> ")[2]) > 200, "second streamed reply")
    p.send_signal(signal.SIGINT)
    out.wait_for(lambda t: t.count(">>> ") == 3, "third input prompt")
    p.stdin.write(b"/exit\n")
    p.stdin.close()
    assert p.wait(timeout=120) == 0
    text, err = out.close(), p.stderr.read().decode()
    assert text.count("stopped (Ctrl-C)") == 2, text[-2000:]
    assert len(re.findall(r"prompt: \d+ new tokens \(\d+ cached\)", text)) == 1  # turn 2 reused turn 1
    assert "Traceback" not in err


def test_ctrl_c_in_run_exits_130_without_traceback():
    folder = build_tiny(*MODELS["mamba"])
    p = subprocess.Popen([sys.executable, "-m", "cli", "run", str(folder), "x", "--raw", "-n", "100000",
                          "--ignore-eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = Output(p.stdout)
    out.wait_for(lambda t: len(t) > 100, "streamed reply")  # loaded and generating
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    out.close()
    err = p.stderr.read().decode()
    assert "Traceback" not in err and "interrupted" in err


def test_ssm_session_restarts_from_the_last_prompt_checkpoint():
    import torch

    from runtime.generate import Session, Stats

    m = load_model(build_tiny(*MODELS["mamba"]), device="cpu")
    g = torch.Generator().manual_seed(3)
    turn1 = torch.randint(5, 320, (40,), generator=g).tolist()
    s = Session(m)
    s.prepare(turn1)
    s.feed(torch.randint(5, 320, (7,), generator=g).tolist())  # a reply that will re-tokenize differently
    turn2 = turn1 + torch.randint(5, 320, (12,), generator=g).tolist()
    st = Stats()
    logits = s.prepare(turn2, st)
    assert (st.cached_tokens, st.prompt_tokens) == (40, 12)  # not a full re-prefill
    full = m.forward(torch.tensor([turn2]))[0, -1]
    assert float((logits - full).abs().max() / full.abs().max()) < 1e-4


def test_bench_reports_speed_memory_and_bandwidth():
    import json

    folder = build_tiny("MambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4,
                                                 expand=2))
    p = subprocess.run([sys.executable, "-m", "cli", "bench", str(folder), "-p", "16", "-n", "4", "-r", "1",
                        "--json", "--no-compile", "-d", "8"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout)
    assert row["arch"] == "mamba" and row["depth"] == 8 and row["compile_s"] == "off"
    for key in ("load_s", "pp16_tps", "tg4_tps", "copy_gbps", "bandwidth_limit_tps", "peak_rss_mib"):
        assert row[key] > 0, key
    assert abs(row["of_limit"] - row["tg4_tps"] / row["bandwidth_limit_tps"]) < 0.01
    table = subprocess.run([sys.executable, "-m", "cli", "bench", str(folder), "-p", "8", "-n", "2", "-r", "1",
                            "--no-compile"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert table.returncode == 0 and "tg2 tps" in table.stdout and "bandwidth limit tps" in table.stdout


def test_threads_default_to_physical_cores_and_obey_the_flag():
    import os

    from runtime.device import physical_cores

    n = physical_cores()
    assert 1 <= n <= os.cpu_count()
    folder = build_tiny("MambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4,
                                                 expand=2))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for flag, want in (([], n), (["--threads", "1"], 1)):
        p = subprocess.run([sys.executable, "-m", "cli", "run", str(folder), "hi", "--raw", "-n", "2", "-v", *flag],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        assert f"({want} thread" in " ".join(p.stderr.split()), p.stderr


MALLOC_PROBE = """
import resource, sys, torch
from runtime.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(10 << 20)  # 40 MiB: above glibc's largest mmap threshold (32 MiB), below the kept size
def step():  # two 40 MiB temporaries alive at once, then freed: as a layer's activations are
    ts = [x * i for i in range(2)]
    del ts
for _ in range(3):
    step()
before = faults()
for _ in range(10):
    step()
print(kept, faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_activations_are_reused_not_faulted_in_again():
    """keep_freed_memory: glibc keeps freed 40 MiB blocks for the next ones (20 allocations, a tenth of the page
    faults or less; without it each is a fresh mapping, faulted in page by page); left alone when the user set
    glibc's malloc variables."""
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = {}
    for arm, extra in (("keep", {}), ("plain", {}), ("keep", {"MALLOC_PERTURB_": "0"})):
        p = subprocess.run([sys.executable, "-c", MALLOC_PROBE, arm], capture_output=True, text=True, cwd=ROOT,
                           env={**env, **extra}, timeout=120)
        assert p.returncode == 0, p.stderr
        runs[arm, bool(extra)] = p.stdout.split()
    assert runs["keep", False][0] == "True" and runs["keep", True][0] == "False", runs  # the user's settings win
    kept, plain = int(runs["keep", False][1]), int(runs["plain", False][1])
    assert plain > 20 * 10240 * 0.9 and kept < plain / 10, runs  # 40 MiB = 10,240 pages


@pytest.mark.parametrize("tied", [False, True])
def test_bench_bytes_a_step_moves(tied):
    """The bandwidth limit's bytes: every weight but an untied embedding's table (a tied head reads it whole),
    plus each Mamba state read and written and each attention layer's keys and values read at the context."""
    from runtime.bench import bytes_per_token, state_bytes_per_token

    folder = build_tiny("JambaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                                 num_attention_heads=4, num_key_value_heads=2, num_experts=2,
                                                 num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                                                 attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                                                 mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                                                 tie_word_embeddings=tied))
    m = load_model(folder, device="cpu", dtype="float32")
    embedding = m.module.input_embedding().weight
    everything = {t.data_ptr(): t.numel() * t.element_size() for t in (*m.module.parameters(), *m.module.buffers())}
    table = embedding.numel() * embedding.element_size()
    assert bytes_per_token(m) == sum(everything.values()) - (0 if tied else table)
    cache = m.make_cache(1)
    states = [c for c in cache if hasattr(c, "ssm")]
    assert len(states) == 2 and len(cache) == 4
    per_position = 2 * 2 * 16 * 4  # keys and values, 2 kv heads of 16, float32
    assert state_bytes_per_token(m, 0) == 2 * sum(c.nbytes for c in states)
    assert state_bytes_per_token(m, 100) - state_bytes_per_token(m, 0) == 2 * 100 * per_position


def test_compile_in_background_is_joined_before_the_first_reply(monkeypatch):
    """chat compiles the CPU decode step in a thread while the first message is typed; the first reply joins it
    and runs compiled steps, with the same words as an eager chat; an error in the compile is raised there."""
    from cli.common import CompileInBackground
    from runtime import compile as comp

    monkeypatch.delenv("MAMBA_CLI_NO_COMPILE", raising=False)
    eager, fast = chat_for("mamba"), chat_for("mamba")
    fast.compiling = CompileInBackground(fast.m)
    before = sum(comp.direct_calls.values())
    for c in (eager, fast):
        c.reply("Hello there")
    assert fast.compiling is None and sum(comp.direct_calls.values()) > before
    assert all(layer.compiled_step for layer in fast.m.module.layers)
    assert fast.messages == eager.messages

    broken = chat_for("mamba")

    def fail():
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(broken.m, "compile", fail)
    broken.compiling = CompileInBackground(broken.m)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        broken.reply("Hello")
