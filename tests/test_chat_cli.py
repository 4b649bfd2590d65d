"""`mamba-cli chat`: turns reuse the cache, /save + --resume continue with no re-prefill, bad files refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from cli.chat import Chat
from cli.common import Sampling
from runtime import load_model
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
    assert b.messages == a.messages and b.session.tokens == a.session.tokens
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


def test_ssm_state_file_size_and_resume_time_do_not_grow_with_history(tmp_path):
    c = chat_for("mamba")
    c.reply("short")
    c.save(str(tmp_path / "short.safetensors"))
    c.m.module.eval()
    long_text = " ".join(["state space models keep a constant-size state"] * 60)
    for _ in range(4):
        c.reply(long_text)
    c.save(str(tmp_path / "long.safetensors"))
    assert len(c.session.tokens) > 1000
    sizes = {}
    for name in ("short", "long"):
        f = tmp_path / f"{name}.safetensors"
        d = chat_for("mamba")
        t0 = time.perf_counter()
        d.load(str(f))
        sizes[name] = (f.stat().st_size, time.perf_counter() - t0, len(d.session.tokens))
    # the state itself is the same size; the file only adds the token ids and messages as metadata
    tensor_bytes = {n: s[0] - 8 * s[2] for n, s in sizes.items()}
    assert tensor_bytes["long"] - tensor_bytes["short"] < 64 * 1024 + len(long_text) * 8
    print(f"resume: {sizes['short'][2]} tokens in {sizes['short'][1] * 1e3:.1f} ms, "
          f"{sizes['long'][2]} tokens in {sizes['long'][1] * 1e3:.1f} ms")


def test_state_of_another_model_is_refused(tmp_path):
    a = chat_for("mamba")
    a.reply("hi")
    a.save(str(tmp_path / "s.safetensors"))
    b = chat_for("mistral")
    with pytest.raises(Exception, match="saved with another model|layers"):
        b.load(str(tmp_path / "s.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a state file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
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
def test_run_command_on_ssm_and_hybrid_folders(name):
    folder = build_tiny(*MODELS[name])
    m = load_model(folder, device="cpu")
    ids = m.tokenizer.encode_prompt("State space")
    from runtime import generate

    expect = list(generate(m, ids, max_new_tokens=10, temperature=0.0))
    tail = ids[-4:]
    want = m.tokenizer.decode(tail + expect)[len(m.tokenizer.decode(tail)):]
    p = subprocess.run([sys.executable, "-m", "cli", "run", str(folder), "State space", "--raw", "-t", "0",
                        "-n", "10"], capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n"
    chat = subprocess.run([sys.executable, "-m", "cli", "chat", str(folder), "-t", "0", "-n", "6", "-v"],
                          input="hello\nagain\n/exit\n", capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert chat.returncode == 0, chat.stderr
    assert len(re.findall(r"prompt: \d+ new tokens", chat.stdout)) == 2 and "cached)" in chat.stdout


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    import signal

    folder = build_tiny(*MODELS["mamba"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "cli", "chat", str(folder), "-t", "0", "-n", "100000", "-v",
                          "--ignore-eos"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    p.stdin.write("tell me everything\n")
    p.stdin.flush()
    time.sleep(8)  # loading + a few hundred tokens
    p.send_signal(signal.SIGINT)
    p.stdin.write("and then?\n")  # the conversation goes on: a second turn, interrupted as well
    p.stdin.flush()
    time.sleep(4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate("/exit\n", timeout=120)
    assert p.returncode == 0, err
    assert out.count("stopped (Ctrl-C)") == 2
    assert len(re.findall(r"prompt: \d+ new tokens \(\d+ cached\)", out)) == 1  # turn 2 reused turn 1
    assert "Traceback" not in err


def test_ctrl_c_in_run_exits_130_without_traceback():
    import signal

    folder = build_tiny(*MODELS["mamba"])
    p = subprocess.Popen([sys.executable, "-m", "cli", "run", str(folder), "x", "--raw", "-n", "100000",
                          "--ignore-eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(8)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err


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
