"""`mamba-cli serve`, driven over loopback by the real `openai` and `mistralai` clients: replies equal
`mamba-cli run` at temperature 0, 8 concurrent streams each equal the reply alone, a client that goes
away frees its row without disturbing the others, bad requests get the documented errors, the queue
limit answers 429, and Ctrl-C ends the streams in flight and releases the port.

Three servers (attention, Mamba, Jamba: the tiny chat models of test_chat_cli) start at once per module.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.fixtures import build_tiny
from tests.test_chat_cli import MODELS

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
HELLO = "Tell me about state space models."
# attention (Mistral, sliding window) needs the key; Mamba has 4 rows and a queue of 4; Jamba defaults
SERVERS = {
    "mistral": ["--api-key", KEY, "--max-tokens", "1000000", "--max-body", "65536"],
    "mamba": ["--max-seqs", "4", "--max-queue", "4", "--max-tokens", "1000000"],
    "jamba": [],
}
DEADLINE = 300  # seconds: only a guard against a hang, never a speed check


def mistral_client():
    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral  # mistralai >= 2 keeps it in the client package
    return Mistral


class Served:
    def __init__(self, name: str):
        self.name, self.folder = name, build_tiny(*MODELS[name])
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(self.folder), "--port", "0",
                                      *SERVERS[name]], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = ""

    def wait_ready(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"serving at (http://\S+)/v1", line)
            if m:
                self.url = m[1]
                self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
                self.reader.start()
                return
        raise AssertionError(f"{self.name} server exited: {''.join(self.log)}")

    def key(self) -> str:
        return KEY if "--api-key" in SERVERS[self.name] else "none"

    @functools.cached_property
    def client(self) -> openai.OpenAI:
        """One client per server (thread-safe; building one costs more than a tiny model's reply)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key(), max_retries=0, timeout=DEADLINE)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=DEADLINE).json()

    def wait_for(self, active: int, waiting: int) -> dict:
        """Wait until the batcher has this many sequences active and waiting (a readiness wait, not a
        timing check); returns /health."""
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            h = self.health()
            if (h["active"], h["waiting"]) == (active, waiting):
                return h
            time.sleep(0.05)
        raise AssertionError(f"{self.name} server: {h}, not {active} active and {waiting} waiting")

    def idle(self) -> dict:
        return self.wait_for(0, 0)

    def post(self, path: str, body, headers: dict | None = None) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=DEADLINE,
                          headers={"Authorization": f"Bearer {self.key()}", **(headers or {})})


def cli_run(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "run", str(folder), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def servers():
    started = {name: Served(name) for name in SERVERS}
    run = cli_run(started["mamba"].folder, HELLO, "-t", "0", "-n", "16")  # the reference, while they start
    try:
        for s in started.values():
            s.wait_ready()
        out, errs = run.communicate(timeout=DEADLINE)
        assert run.returncode == 0, errs
        started["mamba"].run_reply = out.removesuffix("\n")
        yield started
    finally:
        for s in started.values():
            if s.proc.poll() is None:
                s.proc.kill()
            s.proc.wait()


@pytest.fixture(scope="module")
def models():
    from runtime import load_model

    return {name: load_model(build_tiny(*MODELS[name]), device="cpu") for name in SERVERS}


def alone(m, text: str, n: int) -> str:
    """The reply `mamba-cli run` gives (in-process: chat_prompt + stream_text, greedy)."""
    from runtime.chat import chat_prompt
    from runtime.generate import stream_text

    ids, stop = chat_prompt(m, [{"role": "user", "content": text}])
    return "".join(stream_text(m, ids, stop=stop, max_new_tokens=n, temperature=0.0))


def chat_stream(client, text: str, n: int, **kw) -> str:
    parts = []
    for chunk in client.chat.completions.create(model="any", messages=[{"role": "user", "content": text}],
                                                max_tokens=n, temperature=0, stream=True, **kw):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


def test_mamba_cli_run_is_the_reference(servers, models):
    assert servers["mamba"].run_reply == alone(models["mamba"], HELLO, 16)


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_replies_equal_mamba_cli_run(servers, models, name):
    s = servers[name]
    want = alone(models[name], HELLO, 16)  # what `mamba-cli run -t 0 -n 16` prints (the test above)
    o = s.client
    msgs = [{"role": "user", "content": HELLO}]
    r = o.chat.completions.create(model="any", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 16
    usage = []
    parts = []
    for chunk in o.chat.completions.create(model="any", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        usage += [chunk.usage] if chunk.usage else []
    assert "".join(parts) == want
    assert len(usage) == 1 and usage[0].total_tokens == usage[0].prompt_tokens + usage[0].completion_tokens
    mistral = mistral_client()(api_key=s.key(), server_url=s.url)
    r = mistral.chat.complete(model="codestral-mamba-latest", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == usage[0].prompt_tokens
    streamed = "".join(e.data.choices[0].delta.content or "" for e in
                       mistral.chat.stream(model="codestral-mamba-latest", messages=msgs, max_tokens=16,
                                           temperature=0) if e.data.choices)
    assert streamed == want
    assert [m.id for m in o.models.list().data] == [s.folder.name]


def test_raw_completions_equal_the_runtime(servers, models):
    from runtime.generate import stream_text

    s, m = servers["jamba"], models["jamba"]
    want = "".join(stream_text(m, m.tokenizer.encode_prompt("The quick brown"), max_new_tokens=10, temperature=0.0))
    o = s.client
    r = o.completions.create(model="any", prompt="The quick brown", max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    text = "".join(c.choices[0].text for c in o.completions.create(model="any", prompt="The quick brown",
                                                                  max_tokens=10, temperature=0, stream=True))
    assert text == want


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_eight_concurrent_streams_each_equal_alone(servers, models, name):
    s = servers[name]
    s.idle()
    texts = [f"Question {i}: what is {i} + {i * 3}?" + " more" * i for i in range(8)]
    want = [alone(models[name], t, 12) for t in texts]
    got: list = [None] * 8
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        got[i] = chat_stream(s.client, texts[i], 12)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert got == want
    assert s.idle()["steps"] > 0


def test_a_disconnect_does_not_disturb_the_others(servers, models):
    s = servers["mistral"]
    s.idle()
    texts = ["First client.", "Second client, a little longer.", "Third."]
    want = [alone(models["mistral"], t, 24) for t in texts]
    got: list = [None] * 3
    start = threading.Barrier(3)

    def leaver() -> None:
        start.wait()
        stream = s.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Bye."}],
                                                  max_tokens=100_000, stream=True, temperature=0,
                                                  extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()

    def stayer(i: int) -> None:
        start.wait()
        got[i] = chat_stream(s.client, texts[i], 24)

    threads = [threading.Thread(target=leaver)] + [threading.Thread(target=stayer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    got[2] = chat_stream(s.client, texts[2], 24)  # and it still answers
    assert got == want
    assert s.idle()["active"] == 0  # the leaver's row was freed (it asked for 100000 tokens)


def test_a_continued_conversation_reuses_the_cache(servers):
    o = servers["jamba"].client
    msgs = [{"role": "user", "content": "Hello, who are you?"}]
    r1 = o.chat.completions.create(model="any", messages=msgs, max_tokens=8, temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "And?"}]
    r2 = o.chat.completions.create(model="any", messages=msgs, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens


def error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code:
        assert e["code"] == code
    return e["message"]


def test_bad_requests_get_documented_errors(servers, models):
    s = servers["mistral"]
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error(httpx.post(s.url + "/v1/chat/completions", json=ok), 401, "invalid_api_key")
    error(s.post("/v1/chat/completions", ok, {"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    error(s.post("/v1/chat/completions", b'{"messages": ['), 400, "invalid_json")
    error(s.post("/v1/chat/completions", [1, 2]), 400, "invalid_json")
    assert "frobnicate" in error(s.post("/v1/chat/completions", {**ok, "frobnicate": 1}), 400, "unknown_field")
    error(s.post("/v1/chat/completions", {"max_tokens": 2}), 422, "missing_field")
    error(s.post("/v1/chat/completions", {**ok, "temperature": "hot"}), 422, "invalid_value")
    error(s.post("/v1/chat/completions", {**ok, "top_p": 0}), 422, "invalid_value")
    error(s.post("/v1/chat/completions", {**ok, "n": 2}), 422, "invalid_value")
    error(s.post("/v1/chat/completions", {**ok, "messages": [{"role": "robot", "content": "x"}]}), 422)
    error(s.post("/v1/completions", {"prompt": [10**9], "max_tokens": 2}), 422, "invalid_value")
    error(s.post("/v1/chat/completions", {**ok, "stop": "x" * 70_000}), 413, "request_too_large")
    context = models["mistral"].context_length
    msg = error(s.post("/v1/chat/completions", {**ok, "max_tokens": context}), 400, "context_length_exceeded")
    assert str(context) in msg and f"{context} in the completion" in msg
    error(servers["jamba"].post("/v1/completions", {"prompt": "x", "max_tokens": 5000}), 400, "max_tokens_exceeded")
    error(s.post("/v1/nothing", ok), 404)
    with pytest.raises(openai.UnprocessableEntityError):
        s.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}], logprobs=True)
    r = s.post("/v1/chat/completions", ok)  # and it keeps answering
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_full_queue_answers_429_and_recovers(servers):
    s = servers["mamba"]  # 4 rows and a queue of 4
    s.idle()
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 10**6, "ignore_eos": True,
            "stream": True}
    held = []
    with httpx.Client(base_url=s.url, timeout=DEADLINE) as http:
        try:
            for _ in range(8):
                r = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # the first chunk: it is in
                held.append((r, lines))
            s.wait_for(4, 4)
            with pytest.raises(openai.RateLimitError):
                s.client.chat.completions.create(model="any", messages=body["messages"], max_tokens=2)
        finally:
            for r, _ in held:
                r.close()
    s.idle()
    assert chat_stream(s.client, "again", 4)  # the rows are free again


def test_ctrl_c_ends_streams_and_releases_the_port(servers):
    s = servers["mamba"]
    s.idle()
    port = int(s.url.rsplit(":", 1)[1])
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 10**6, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=DEADLINE) as r:
        lines = r.iter_lines()
        next(lines)
        s.proc.send_signal(signal.SIGINT)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
    assert s.proc.wait(DEADLINE) == 130  # the CLI's exit code for Ctrl-C
    s.reader.join(DEADLINE)  # stderr read to its end
    assert not any("Traceback" in line or "ERROR" in line for line in s.log), "".join(s.log)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))  # nothing listens
    with socket.socket() as sock:  # and a new server can listen there (TIME_WAIT left by closed connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # is what SO_REUSEADDR is for)
        sock.bind(("127.0.0.1", port))
