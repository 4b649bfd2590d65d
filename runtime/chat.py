"""Chat formatting: messages -> the prompt token ids a model was trained on.

    chat_prompt(model, messages, system) -> (ids, stop strings)   what run and chat feed the model
    render(messages, tokenizer)       -> list[int]   the prompt ids of a conversation
    render_text(messages, tokenizer)  -> str         the same prompt as text (for show/verbose)
    chat_format(tokenizer, ...)       -> "template" | "mistral-v3" | "mistral-v1" | "plain"
    check_messages(messages)          -> plain JSON copies, roles and contents checked (also for /load)
    stop_strings(fmt)                 -> text that ends a reply besides the EOS ids

Which format (docs/chat-templates.md): an explicit template, else the tokenizer's chat_template, else
Mistral's [INST] v3 (the vocabulary has [INST]/[/INST] control tokens), else Mistral v1 (a Llama /
Mistral / Mamba-2 model with a <s> </s> SentencePiece vocabulary), else a plain "User:/Assistant:"
transcript.

Templates are untrusted code from the Hub: they run in jinja2's ImmutableSandboxedEnvironment with
transformers' globals, under a time cap (TEMPLATE_SECONDS) and a size cap (TEMPLATE_MAX_CHARS) on the
output and on every value built. The size cap is checked *before* an operation allocates: the result
size of `*`, `**`, `+`, `%`, `~`, and of join / replace / indent / format / expandtabs is computed from
the operands first (a value's size counts the characters and items of everything it holds), because
work inside C (a 2 GB string repeat) cannot be interrupted by the alarm.
Message text never becomes a control token: the template is rendered with every message content
replaced by a unique placeholder, the output is split at the placeholders, and only the template's
own text may spell control tokens (Tokenizer.encode_parts).

The Mistral formats reproduce mistral-common's encode_chat_completion token for token: system
messages are joined with a blank line and put in front of the first (v1) or last (v3) user message,
consecutive messages of one role are merged, and every assistant reply ends with </s>.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from runtime.errors import MambaCliError

TEMPLATE_SECONDS = 2.0  # a chat template that renders longer than this is stopped
TEMPLATE_MAX_CHARS = 1_000_000  # ... and one whose output (or any value it builds) grows past this
MISTRAL_ARCHS = frozenset({"llama", "mistral", "mixtral", "mamba2"})
PLAIN_NAMES = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_STOP = ["\nUser:"]
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(MambaCliError):
    """A chat template failed, was refused by the sandbox, or ran past its caps."""


# ---- public API ------------------------------------------------------------------------------------


def chat_format(tokenizer, template: str | None = None, arch_hint: str | None = None) -> str:
    """Which of the formats render() will use for this tokenizer / template / architecture."""
    if template or tokenizer.chat_template:
        return "template"
    if tokenizer.is_special("[INST]") and tokenizer.is_special("[/INST]"):
        return "mistral-v3"
    if arch_hint in MISTRAL_ARCHS and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>":
        return "mistral-v1"
    return "plain"


def stop_strings(fmt: str) -> list[str]:
    """Strings that end a reply in format fmt (the EOS ids end it in every format)."""
    return list(PLAIN_STOP) if fmt == "plain" else []


def chat_prompt(model, messages: list[dict], system: str | None = None) -> tuple[list[int], list[str]]:
    """A loaded model's prompt ids for a conversation (the system prompt, when given, first) and the
    stop strings of the chat format it was rendered in."""
    hint = model.config.get("model_type")
    messages = ([{"role": "system", "content": system}] if system else []) + messages
    return (render(messages, model.tokenizer, arch_hint=hint),
            stop_strings(chat_format(model.tokenizer, arch_hint=hint)))


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = True, template: str | None = None,
           arch_hint: str | None = None) -> list[int]:
    """The prompt ids for a conversation, ready to prefill."""
    messages = check_messages(messages)
    fmt = chat_format(tokenizer, template, arch_hint)
    if fmt == "template":
        return _render_template(messages, tokenizer, template or tokenizer.chat_template,
                                add_generation_prompt)[1]
    if fmt == "mistral-v3":
        return _mistral_v3(messages, tokenizer)
    if fmt == "mistral-v1":
        return _mistral_v1(messages, tokenizer)
    return _plain(messages, tokenizer, add_generation_prompt)[1]


def render_text(messages: list[dict], tokenizer, add_generation_prompt: bool = True,
                template: str | None = None, arch_hint: str | None = None) -> str:
    """The prompt as text: the template's output, or the Mistral / plain prompt decoded."""
    messages = check_messages(messages)
    fmt = chat_format(tokenizer, template, arch_hint)
    if fmt == "template":
        return _render_template(messages, tokenizer, template or tokenizer.chat_template,
                                add_generation_prompt)[0]
    if fmt == "plain":
        return _plain(messages, tokenizer, add_generation_prompt)[0]
    return tokenizer.decode(render(messages, tokenizer, add_generation_prompt, template, arch_hint))


def check_messages(messages: list[dict]) -> list[dict]:
    """Plain copies of the messages (templates see only JSON types), checked for role and content."""
    if not isinstance(messages, list):
        raise MambaCliError("chat messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise MambaCliError(f"chat message {i}: needs a role, one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, (str, list)) or (isinstance(content, list)
                                                     and not all(isinstance(p, dict) for p in content)):
            raise MambaCliError(f"chat message {i}: content must be text or a list of parts")
        out.append(json.loads(json.dumps({**m, "content": content})))
    return out


def _text(m: dict) -> str:
    c = m["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


# ---- jinja templates -------------------------------------------------------------------------------


class _Budget:
    """Wall-clock and size limits for one render; checked from the sandbox's hooks, sizes before the
    operation that would build them."""

    def __init__(self, seconds: float, max_chars: int):
        self.deadline = time.monotonic() + seconds
        self.seconds, self.max_chars = seconds, max_chars
        self.max_int_bits = 1 << 16  # integers past 2^65536 are refused (their arithmetic is slow C work)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template stopped: still rendering after {self.seconds:g} s")

    def over(self, what: str) -> ChatTemplateError:
        return ChatTemplateError(f"chat template stopped: {what} would be over the size cap of "
                                 f"{self.max_chars} characters or items")

    def weight(self, value: Any, limit: int | None = None, depth: int = 0) -> int:
        """Characters and items held by value, nested containers included; counting stops past `limit`."""
        limit = self.max_chars if limit is None else limit
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value.bit_length() // 3 + 1  # about its decimal digits
        if not isinstance(value, (list, tuple, dict)):
            return 1
        if depth > 64:
            raise ChatTemplateError("chat template stopped: values nested over 64 deep")
        total = len(value)
        items = value.items() if isinstance(value, dict) else ((v, None) for v in value)
        for a, b in items:
            total += self.weight(a, limit, depth + 1) + (self.weight(b, limit, depth + 1) if b is not None else 0)
            if total > limit:
                break
        return total

    def size(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > self.max_int_bits:
            raise ChatTemplateError("chat template stopped: it built an integer over 2^65536")
        if isinstance(value, (str, bytes, list, tuple, dict)) and self.weight(value) > self.max_chars:
            raise ChatTemplateError(f"chat template stopped: it built a value over {self.max_chars} items")
        return value

    def need(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise self.over(what)

    def args(self, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_chars:
                raise ChatTemplateError(f"chat template stopped: argument {a} is over the size cap")

    def binop(self, op: str, left: Any, right: Any) -> None:
        """Refuse `left op right` when its result would pass the caps, before computing it."""
        seq = (str, bytes, list, tuple)
        num = (int, float)
        if op == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, seq) and isinstance(b, int):
                    self.need(self.weight(a) * max(b, 0), "a repeated value")
            if isinstance(left, int) and isinstance(right, int) and (
                    left.bit_length() + right.bit_length() > self.max_int_bits):
                raise ChatTemplateError("chat template stopped: an integer product over 2^65536")
        elif op == "+" and isinstance(left, seq) and isinstance(right, seq):
            self.need(self.weight(left) + self.weight(right), "a concatenation")
        elif op == "**" and isinstance(left, num) and isinstance(right, num):
            if abs(right) > 64:
                raise ChatTemplateError(f"chat template stopped: exponent {right} is over the cap")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > self.max_int_bits:
                raise ChatTemplateError("chat template stopped: a power over 2^65536")
        elif op == "%" and isinstance(left, str):
            self.percent(left, right)

    def percent(self, fmt: str, values: Any) -> None:
        """`fmt % values`: every width and precision counted, `*` widths refused."""
        total = len(fmt) + self.weight(values)
        for m in _PERCENT_SPEC.finditer(fmt):
            if "*" in m.group(0):
                raise ChatTemplateError("chat template refused: a '*' width in a % format")
            total += sum(int(g) for g in m.groups() if g)
        self.need(total, "a % format")

    def braces(self, fmt: str, args: tuple, kwargs: dict) -> None:
        """`fmt.format(...)`: every number in a replacement field's spec counted as a width."""
        total = len(fmt) + self.weight(list(args)) + self.weight(kwargs)
        for field in _BRACE_FIELD.findall(fmt):
            spec = field.partition(":")[2]
            total += sum(int(d) for d in re.findall(r"\d+", spec))
        self.need(total, "a str.format")

    def concat(self, parts: tuple) -> None:
        self.need(sum(self.weight(p) for p in parts), "a ~ concatenation")

    def method(self, obj: Any, args: tuple, kwargs: dict) -> None:
        """The str methods whose result can outgrow their operands and the size-capped arguments."""
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
        if not isinstance(owner, str):
            return
        if name == "replace" and len(args) >= 2:
            self.replaced(owner, *args[:3])
        elif name == "join" and args:
            self.need(self.weight(args[0]) + len(owner) * self.weight(args[0]), "a join")
        elif name == "expandtabs":
            width = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(width, int):
                self.need(len(owner) + owner.count("\t") * width, "expandtabs")

    def replaced(self, s: Any, old: Any, new: Any, count: Any = None) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            hits = s.count(old) if old else len(s) + 1
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            self.need(len(s) + hits * len(new), "a replace")

    def filtered(self, name: str, args: tuple, kwargs: dict) -> None:
        """Pre-checks for the filters whose output can outgrow their input."""
        if not args:
            return
        value, rest = args[0], args[1:]
        if name == "join":
            sep = rest[0] if rest else kwargs.get("d", "")
            n = len(value) if isinstance(value, (list, tuple, dict, str)) else 0
            self.need(self.weight(value) + n * len(str(sep)), "a join")
        elif name == "replace" and len(rest) >= 2:
            self.replaced(value, *rest[:3])
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            pad = width if isinstance(width, int) else len(str(width))
            self.need(len(value) + (value.count("\n") + 1) * pad, "an indent")
        elif name == "format" and isinstance(value, str):
            self.percent(value, (list(rest), kwargs))
        elif name in ("center", "wordwrap", "truncate", "string", "tojson", "pprint"):
            self.need(self.weight(value), f"the {name} filter's input")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_BRACE_FIELD = re.compile(r"\{([^{}]*)\}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every call, attribute access, operator, filter and `~` on a budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    budget: _Budget

    def call(self, context, obj, /, *args, **kwargs):  # type: ignore[override]
        self.budget.tick()
        self.budget.args(args, kwargs)
        self.budget.method(obj, args, kwargs)
        return self.budget.size(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """str.format / format_map, sandboxed by jinja2 when looked up: sized before they run."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, budget = value.__self__, self.budget

        @functools.wraps(wrapper)
        def sized(*args, **kwargs):
            budget.braces(fmt, args, kwargs)
            return wrapper(*args, **kwargs)

        return sized

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a "
                                              f"{type(obj).__name__!r} object is unsafe")

    def getattr(self, obj, attribute):
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.budget.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self.budget.tick()
        self.budget.binop(operator, left, right)
        return self.budget.size(super().call_binop(context, operator, left, right))

    def concat(self, parts: tuple) -> str:
        """`a ~ b ~ ...` (the code generator below sends it here): sized before it is joined."""
        self.budget.tick()
        self.budget.concat(parts)
        return "".join(map(str, parts))  # what jinja2's str_join does (templates render without autoescape)


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """jinja2's code generator, but `~` calls the sandbox's concat() instead of a bare str.join."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_Sandbox.code_generator_class = _CodeGenerator


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Range:
    """range() whose iteration stays on the render's time budget (nested loops add no output)."""

    def __init__(self, budget: _Budget, *args: int):
        self.r, self.budget = safe_range(*args), budget

    def __iter__(self) -> Iterator[int]:
        for i in self.r:
            self.budget.tick()
            yield i

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i):
        return self.r[i]

    def __contains__(self, x) -> bool:
        return x in self.r


def _guard_filter(name: str, f: Callable, budget: _Budget) -> Callable:
    passed = getattr(f, "jinja_pass_arg", None)  # filters that take the eval context / environment first

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        budget.tick()
        values = args[1:] if passed is not None else args
        budget.args(values[1:], kwargs)
        budget.filtered(name, values, kwargs)
        return budget.size(f(*args, **kwargs))

    return guarded


def _environment(budget: _Budget) -> _Sandbox:
    """transformers' chat-template environment (trim_blocks, lstrip_blocks, tojson without ASCII escapes,
    raise_exception, strftime_now, loop controls), every hook on `budget`."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.budget = budget

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
            super().__setitem__(name, budget.size(value))

    env.filters["tojson"] = tojson
    env.filters = {k: _guard_filter(k, f, budget) for k, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs: no template needs it
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       range=lambda *a: _Range(budget, *a))
    return env


class _Alarm:
    """SIGALRM after `seconds` on the main thread (stops pure-Python loops that touch no hook)."""

    def __init__(self, seconds: float):
        self.seconds, self.armed, self.old = seconds, False, None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
                and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):
            def on_alarm(signum, frame):
                raise ChatTemplateError(f"chat template stopped: still rendering after {self.seconds:g} s")

            self.old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds + 0.25)
            self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


def run_template(template: str, context: dict[str, Any], seconds: float | None = None,
                 max_chars: int | None = None) -> str:
    """Render an untrusted template in the capped sandbox; every failure is one ChatTemplateError line.

    The caps default to TEMPLATE_SECONDS and TEMPLATE_MAX_CHARS."""
    seconds = TEMPLATE_SECONDS if seconds is None else seconds
    max_chars = TEMPLATE_MAX_CHARS if max_chars is None else max_chars
    budget = _Budget(seconds, max_chars)
    out: list[str] = []
    total = 0
    try:
        with _Alarm(seconds):
            compiled = _environment(budget).from_string(template)
            for chunk in compiled.generate(**context):
                total += len(chunk)
                if total > max_chars:
                    raise ChatTemplateError(f"chat template stopped: output passed {max_chars} characters")
                budget.tick()
                out.append(chunk)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {_line(e)}") from None
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error, line {e.lineno}: {_line(e)}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {_line(e)}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise ChatTemplateError(f"chat template stopped: {type(e).__name__} {_line(e)}") from None
    except Exception as e:  # a template can raise anything its expressions raise
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {_line(e)}") from None
    return "".join(out)


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _render_template(messages: list[dict], tokenizer, template: str,
                     add_generation_prompt: bool) -> tuple[str, list[int]]:
    context = {"add_generation_prompt": add_generation_prompt, "bos_token": tokenizer.bos_token or "",
               "eos_token": tokenizer.eos_token or "", "tools": None, "documents": None}
    real = run_template(template, {**context, "messages": messages})
    nonce = "".join(str(secrets.randbelow(10)) for _ in range(12))
    marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    cores: list[str] = []

    def hide(text: str) -> str:
        core = text.strip()
        if not core or not text:
            return text
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        cores.append(core)
        return f"{lead}\ue000{nonce}:{len(cores) - 1}\ue001{trail}"

    hidden = []
    for m in messages:
        c = m["content"]
        if isinstance(c, str):
            c = hide(c)
        else:
            c = [{**p, "text": hide(p["text"])} if isinstance(p.get("text"), str) else p for p in c]
        hidden.append({**m, "content": c})
    shown = run_template(template, {**context, "messages": hidden})
    pieces = marker.split(shown)  # template, index, template, index, ..., template
    parts: list[tuple[str, bool]] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            parts.append((piece, True))
        elif int(piece) < len(cores):
            parts.append((cores[int(piece)], False))
        else:
            parts.append((piece, False))
    safe = tokenizer.encode_parts(parts)
    if "".join(p for p, _ in parts) == real:
        return real, safe
    # The template rewrote message text (trimmed it, cut a reasoning block, ...): its own output is the
    # prompt unless message text added control tokens to it, in which case the placeholder split stands.
    direct = tokenizer.encode(real, special=True)
    specials = tokenizer.special_ids()
    if [i for i in direct if i in specials] == [i for i in safe if i in specials]:
        return real, direct
    return real, safe


# ---- built-in formats ------------------------------------------------------------------------------


def _mistral_turns(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """mistral-common's normalization: (system prompt, [(role, text)]) with runs of a role merged."""
    systems = [_text(m) for m in messages if m["role"] == "system" and _text(m)]
    turns: list[tuple[str, str]] = []
    run_role, run = None, []
    for m in [*messages, {"role": None, "content": ""}]:
        if m["role"] != run_role:
            if run_role in ("user", "assistant"):
                turns.append((run_role, "\n\n".join(run)))
            elif run_role == "tool":
                raise MambaCliError("tool messages need a chat template (the Mistral formats have none)")
            run_role, run = m["role"], []
        run.append(_text(m))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return ("\n\n".join(systems) if systems else None), turns


def _mistral_v1(messages: list[dict], tok) -> list[int]:
    """<s>[INST] user [/INST] answer</s>[INST] ... : [INST] is text; system before the first user turn."""
    system, turns = _mistral_turns(messages)
    ids = [tok.bos_id]
    first_user = True
    for role, text in turns:
        if role == "user":
            if first_user and system:
                text = f"{system}\n\n{text}"
            first_user = False
            ids += tok.encode(f"[INST] {text} [/INST]")
        else:
            ids += tok.encode(text) + [tok.eos_ids[0]]
    return ids


def _mistral_v3(messages: list[dict], tok) -> list[int]:
    """<s>[INST]user[/INST]answer</s>... with [INST]/[/INST] control ids; system before the last user turn."""
    system, turns = _mistral_turns(messages)
    inst, end_inst = tok.token_to_id("[INST]"), tok.token_to_id("[/INST]")
    last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
    ids = [tok.bos_id]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            if i == last_user and system:
                text = f"{system}\n\n{text}"
            ids += [inst, *tok.encode(text), end_inst]
        else:
            ids += tok.encode(text.rstrip(" ")) + [tok.eos_ids[0]]
    return ids


def _plain(messages: list[dict], tok, add_generation_prompt: bool) -> tuple[str, list[int]]:
    """A transcript for models with no chat format: system text, then 'User: ...' / 'Assistant: ...' lines."""
    systems = [_text(m) for m in messages if m["role"] == "system" and _text(m)]
    lines = ["\n\n".join(systems) + "\n\n"] if systems else []
    for m in messages:
        if m["role"] != "system":
            lines.append(f"{PLAIN_NAMES[m['role']]}: {_text(m)}\n")
    if add_generation_prompt:
        lines.append("Assistant:")
    text = "".join(lines)
    ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)
    return text, ids
