"""Decode-step capture on the CPU: each block's one-token work as torch.compile'd graphs (inductor).

A small model's decode step in eager PyTorch is dominated by dispatching ~40 tiny ops per layer.
The model files route one-token steps through functions wrapped by `graph()`: inductor fuses their
elementwise chains (norms, RoPE, conv and SSM state updates, gates) into a few C++ loops and calls the
matmuls and int4 kernels as they are. Weights are graph inputs, so one compiled graph serves every
layer of the same structure. What has growing shapes (the KV-cache append and SDPA) or data-dependent
control flow (MoE routing) stays eager between the graphs.

Off unless turned on per model (`LoadedModel.compile()`; the CLI does it on the CPU unless
`--no-compile` or MAMBA_CLI_NO_COMPILE=1). The first compile of a model shape takes seconds; torch
keeps the generated code on disk (~/.cache/mamba-cli/inductor), so later runs take ~1-3 s.
Anything that cannot compile (no C++ compiler, an op inductor does not take) falls back to eager for
good, its reason kept in `failures`.
"""

from __future__ import annotations

import collections
import functools
import inspect
import operator
import os
import shutil
import time
import weakref
from collections.abc import Callable

import torch

from runtime.cache import KVCache

failures: dict[str, str] = {}  # function name -> why it runs eagerly
compiled_calls: dict[str, int] = {}  # function name -> calls served by compiled code
direct_calls: dict[str, int] = {}  # function name -> of those, calls that skipped dynamo (DirectCall)


def unavailable() -> str | None:
    """Why decode-step compilation cannot be used here, or None."""
    if os.environ.get("MAMBA_CLI_NO_COMPILE"):
        return "MAMBA_CLI_NO_COMPILE is set"
    if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        return "no C++ compiler (g++) on PATH"
    return None


# torch fixes its cache folder the first time anything asks for it (loading int4 kernels does): set ours first.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                   "mamba-cli", "inductor"))


def setup() -> None:
    import torch._dynamo  # not at module top: ~3 s of imports (measured) only compiling needs

    from quant import native

    native.register_fakes()

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(cfg, name, max(getattr(cfg, name), 16))
    # float attributes (a norm's eps) as constants: by default a second value seen (another model in the
    # process: SmolLM2's 1e-5 after jamba's 1e-6) turns them into graph inputs of 0-d tensors that
    # DirectCall does not take, and every later call of that graph went through dynamo (SmolLM2 decode
    # 72 -> 32 tok/s after jamba in one process, measured)
    if hasattr(cfg, "specialize_float"):
        cfg.specialize_float = True


def graph(fn: Callable | None = None, *, dynamic: bool | None = False, inductor: dict | None = None) -> Callable:
    """fn, compiled (one whole graph) the first time it is called with compile on.

    Static shapes unless `dynamic=None`: then sizes the caller marks with `torch._dynamo.
    maybe_mark_dynamic` (a KV cache's length) stay symbolic, so one graph serves every length.
    `inductor`: inductor config settings for compiling this function's graphs.
    Callers decide when (block.compiled_step); this wrapper only compiles and falls back.

    After a call through torch.compile, later calls with the same modules and tensors of the same kind
    call the compiled graph directly (DirectCall): no dynamo frame, cache lookup or guards, which cost
    ~110 us a call here, a third of a small model's layer.
    """
    if fn is None:
        return functools.partial(graph, dynamic=dynamic, inductor=inductor)
    name = fn.__qualname__
    holder: dict[str, Callable] = {}
    direct: dict[tuple, list[DirectCall]] = {}  # the modules' ids -> calls captured with them
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def run(*args):
        if name in failures:
            return fn(*args)
        key = tuple(id(a) for a in args if isinstance(a, torch.nn.Module))
        for d in direct.get(key, ()):
            out = d(args)
            if out is not MISS:
                compiled_calls[name] = compiled_calls.get(name, 0) + 1
                direct_calls[name] = direct_calls.get(name, 0) + 1
                return out
        c = holder.get("c")
        if c is None:
            backend = functools.partial(_backend, inductor=inductor) if inductor else _backend
            c = holder["c"] = torch.compile(fn, dynamic=dynamic, fullgraph=True, backend=backend)
        _ran.clear()
        try:
            out = c(*args)
        except Exception as e:
            from torch._dynamo import exc  # loaded by torch.compile by now (setup())

            if isinstance(e, getattr(exc, "FailOnRecompileLimitHit", ())):  # not a TorchDynamoException
                # this call's kinds of inputs would make one graph too many: this call eager, the graphs
                # compiled so far still serve theirs
                return fn(*args)
            if not isinstance(e, exc.TorchDynamoException):
                raise
            # a compile-time failure (graph break, no compiler, an op inductor refuses): nothing ran yet
            failures[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            return fn(*args)
        compiled_calls[name] = compiled_calls.get(name, 0) + 1
        ran, _ran[:] = list(_ran), []
        if len(ran) == 1 and DIRECT and len(direct.get(key, ())) < 4:
            d = DirectCall.capture(ran[0], dict(zip(params, args, strict=False)), args, out, name)
            if d is not None:
                if key not in direct and key:  # dropped with the modules (d holds their parameters)
                    weakref.finalize(next(a for a in args if isinstance(a, torch.nn.Module)), direct.pop, key, None)
                direct.setdefault(key, []).insert(0, d)  # newest first: a grown cache matches the latest
        for r in ran:
            r.forget()
        return out

    def bind(args: tuple, free: int, out) -> Bound | None:
        """A Bound call of this graph for calls with these very objects in every argument but args[free]
        (see Bound), made after a call with them that gave `out`; None where no direct call takes these
        arguments (not compiled yet, a fallback)."""
        if name in failures:
            return None
        key = tuple(id(a) for a in args if isinstance(a, torch.nn.Module))
        for d in direct.get(key, ()):
            b = d.bind(args, free, name, out)
            if b is not None:
                return b
        return None

    def latest(modules: tuple) -> DirectCall | None:
        """The newest direct call captured with these modules (in argument order), or None."""
        ds = direct.get(tuple(id(m) for m in modules))
        return ds[0] if ds and name not in failures else None

    run.direct = direct  # for tests: the captured direct calls
    run.bind = bind
    run.latest = latest
    return run


# ---------------------------------------------------------------- calling compiled graphs directly
# torch.compile's call path (dynamo's frame hook, cache lookup, guards, the bytecode that gathers the
# graph's inputs) costs ~110 us a call on this machine (measured on SmolLM2's layer: 404 us through
# dynamo, 297 us calling the same compiled graph), ~3 ms of a 22 ms decode step. Our graphs are called
# from a handful of places with arguments whose kinds never change between decode steps: the same
# modules, and activations / cache views of fixed dtype, rank and static sizes. So after dynamo has
# compiled and run a graph once, `DirectCall` calls it itself: it gathers the inputs as dynamo did (from
# the sources dynamo recorded for each graph input: `L['attn']._modules['o_proj']._buffers['blocks']`),
# checks what dynamo's guards would check for our call sites (the same module objects and parameter
# tensors, tensor inputs of the same dtype, device, sizes and strides except the symbolic ones, which
# must stay >= 2 as dynamo assumed; grad mode), and calls the compiled graph. Anything else goes through
# dynamo, which recompiles if it must and captures again. Set MAMBA_CLI_NO_DIRECT=1 to always go
# through dynamo. Where aot_autograd's wrappers only passed the captured call's inputs to inductor's entry
# and its outputs back (the usual case: state updates happen inside the graph), DirectCall calls that
# entry itself: mamba2-130m's step 6.36 -> 5.93 ms, jamba-small's 5.25 -> 4.99 (in-process A/B, p25).

DIRECT = not os.environ.get("MAMBA_CLI_NO_DIRECT")
_generation = [0]  # bumped whenever any module registers or replaces a parameter, buffer or submodule


def _bump(*_args):
    _generation[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)
MISS = object()  # a DirectCall's answer when the call does not match what it captured
_ran: list[_Ran] = []  # the compiled graphs run during the current call through dynamo


class _Ran:
    """One compiled graph as dynamo called it: the graph, its inputs' sources, the last inputs and outputs;
    and inductor's own entry behind aot_autograd's wrappers (`inner`) with what it last took and gave."""

    def __init__(self, compiled: Callable, sources: list, shapes: list):
        self.compiled, self.sources, self.shapes = compiled, sources, shapes
        self.args: tuple = ()
        self.out = None
        self.inner: Callable | None = None
        self.inner_args: list[int] | None = None  # ids of the inputs the inner entry last took
        self.inner_out = None

    def forget(self) -> None:
        """Drop the last call's inputs and outputs (KV views, activations) so they are not kept alive."""
        self.args, self.out, self.inner_args, self.inner_out = (), None, None, None


def _backend(gm: torch.fx.GraphModule, example_inputs, inductor: dict | None = None):
    """Inductor, with a record of each call (`_ran`) so that `graph()` can capture it as a DirectCall."""
    from torch._inductor.compile_fx import compile_fx

    # no size, stride and alignment asserts in the generated wrapper: 20-odd Python calls (~20 us) on every
    # call of a graph whose inputs DirectCall or dynamo's guards have already checked
    with torch._inductor.config.patch(size_asserts=False, alignment_asserts=False, scalar_asserts=False,
                                      **(inductor or {})):
        compiled = compile_fx(gm, example_inputs)
    sources, shapes = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            sources.append(getattr(node.meta.get("grapharg"), "source", None))
            shapes.append(_static_shape(node.meta.get("example_value")))
    ran = _Ran(compiled, sources, shapes)
    # aot_autograd's wrappers around inductor's entry (a dynamo-disabled frame, the runtime wrapper, the
    # CompiledFxGraph's own call) cost 6-10 us a call with warm caches and ~65 us after a decode step's weight
    # stream has evicted their code and data (measured). Record what the entry takes and gives, so that
    # DirectCall can call it itself where the wrappers only pass inputs and outputs through (capture checks).
    for graph_fn in _graphs_behind(compiled):
        _record_inner(ran, graph_fn)

    def call(*args):
        ran.args = args
        out = compiled(*args)
        ran.out = out
        _ran.append(ran)
        return out

    return call


def _graphs_behind(fn: Callable) -> list:
    """The inductor graphs (CompiledFxGraph) that aot_autograd's wrappers around `fn` hold: found through
    closures and instance attributes, as the one called is not always the one `fn`'s attributes name."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        return []
    found, seen, todo = [], set(), [(fn, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > 8:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            found.append(obj)
            continue
        if inspect.isfunction(obj):  # closures and attributes, never globals
            todo += [(c.cell_contents, depth + 1) for c in obj.__closure__ or () if _cell_full(c)]
            todo += [(v, depth + 1) for v in vars(obj).values()]
        elif hasattr(obj, "__dict__") and hasattr(obj, "compiled_fn") and not isinstance(obj, type):
            todo += [(v, depth + 1) for v in vars(obj).values()]
    return found


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _record_inner(ran: _Ran, graph_fn) -> None:
    """Have `graph_fn`'s entry note what it takes and gives into `ran` (for DirectCall.capture)."""
    inner = getattr(graph_fn, "current_callable", None)
    inner = getattr(inner, "inner", inner)  # recorded for an earlier compile already: the entry itself
    if inner is None or not callable(inner):
        return

    def recording(inputs):
        ran.inner, ran.inner_args = inner, [id(a) for a in inputs]  # before the entry empties the list
        out = inner(inputs)
        ran.inner_out = out
        return out

    recording.inner = inner
    graph_fn.current_callable = recording


def _static_shape(fake) -> tuple[tuple, tuple] | None:
    """A graph input's sizes and strides as the graph was compiled for them, None where symbolic."""
    if not isinstance(fake, torch.Tensor):
        return None
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    def concrete(values):
        return tuple(int(v) if is_concrete_int(v) else None for v in values)

    return concrete(fake.shape), concrete(fake.stride())


def _source_name(source) -> str | None:
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


class DirectCall:
    """A compiled graph called without dynamo, for calls like the one it was captured from."""

    def __init__(self, inner, compiled, params, n_args, names, fixed, tensors, symbolic, other, single, grad):
        from torch._C._dynamo.guards import TensorGuards  # dynamo's own C++ tensor check

        self.inner = inner  # inductor's entry (takes a list of the inputs), or None: through aot's wrappers
        self.compiled = compiled
        self.params = params  # the function's parameter names, for `L`
        self.n_args = n_args
        # parameters and buffers (reached through a module argument): fetched at capture, passed as `F`;
        # fetched again and compared by identity only after some module changed its parameters (_generation)
        self.fixed = tuple(t for _, t in fixed)
        self.names = names
        self.shapes = {i: (sz, st) for i, (_, sz, st) in tensors}  # tensor inputs: sizes, strides (None: symbolic)
        slot = {i: f"F[{j}]" for j, (i, _) in enumerate(fixed)}
        env = {"__builtins__": {}}
        self.gather = eval(f"lambda L, F: ({''.join(slot.get(i, n) + ', ' for i, n in enumerate(names))})", env)  # noqa: S307
        self.refetch = eval(f"lambda L: ({''.join(names[i] + ', ' for i, _ in fixed)})", env)  # noqa: S307
        self.generation = _generation[0]
        # the other tensors: dtype, device, dispatch keys (inference or not), sizes and strides where static
        self.tensors_at = operator.itemgetter(*(i for i, _ in tensors), 0, 0)  # (two extra: always a tuple)
        self.check = TensorGuards(*(t for _, (t, _, _) in tensors),
                                  dynamic_dims_sizes=[list(sz) for _, (_, sz, _) in tensors],
                                  dynamic_dims_strides=[list(st) for _, (_, _, st) in tensors]).check
        self.n_tensors = len(tensors)
        self.symbolic = symbolic  # input indices of symbolic sizes and strides (each must be >= 2)
        # what the inputs other than module parameters are (for Chain): sources, and kinds where tensors
        self.open = (tuple((names[i], _kind(t, sz, st)) for i, (t, sz, st) in tensors)
                     + tuple(names[i] for i in symbolic))
        self.other = other  # [(argument index, its value's structure)]: arguments neither tensor nor module
        self.single = single  # the function returns one tensor (else a tuple)
        self.grad = grad

    @classmethod
    def capture(cls, ran: _Ran, local: dict, args: tuple, out, fn_name: str = "") -> DirectCall | None:
        """A DirectCall for calls like this one, or None when one cannot be made safely: a graph input
        whose source is not a plain expression, inputs the sources do not reproduce exactly, or a result
        that is not the graph's own outputs (dynamo rebuilt it)."""
        names = [_source_name(s) for s in ran.sources]
        if not names or any(n is None or not n.startswith("L[") for n in names):
            return None
        try:
            gather = eval(f"lambda L: ({', '.join(names)},)", {"__builtins__": {}})  # noqa: S307 (dynamo's own source names)
            got = gather(local)
        except Exception:
            return None
        if len(got) != len(ran.args) or not all(
                (a is b) if isinstance(a, torch.Tensor) else (type(a) is type(b) and a == b)
                for a, b in zip(got, ran.args, strict=True)):
            return None
        outs = list(ran.out) if isinstance(ran.out, (list, tuple)) else [ran.out]
        if isinstance(out, torch.Tensor):
            single, result = True, [out]
        elif isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out):
            single, result = False, list(out)
        else:
            return None
        if len(result) != len(outs) or not all(a is b for a, b in zip(result, outs, strict=True)):
            return None
        module_roots = tuple(f"L[{k!r}]" for k, v in local.items() if isinstance(v, torch.nn.Module))
        symbolic, fixed, tensors = [], [], []
        for i, (name, value, shape) in enumerate(zip(names, got, ran.shapes, strict=True)):
            if isinstance(value, int):
                symbolic.append(i)  # a symbolic size or stride dynamo passes in
            elif not isinstance(value, torch.Tensor) or shape is None:
                return None  # an input of a kind this does not check
            elif name.startswith(module_roots):
                fixed.append((i, value))
            else:
                tensors.append((i, (value, *shape)))
        other = [(i, _structure(a)) for i, a in enumerate(args) if not isinstance(a, (torch.Tensor, torch.nn.Module))]
        # inductor's entry called directly where aot_autograd's wrappers passed this call's inputs and outputs
        # through unchanged (no deduplicated or synthesized inputs, no mutations applied or outputs rebuilt
        # after the graph): their code is fixed at compile time, so they do the same for every matching call
        passes = (ran.inner is not None and ran.inner_args == [id(a) for a in ran.args]
                  and isinstance(ran.inner_out, (list, tuple)) and len(ran.inner_out) == len(outs)
                  and all(a is b for a, b in zip(ran.inner_out, outs, strict=True)))
        d = cls(ran.inner if passes else None, ran.compiled, list(local), len(args), names, fixed, tensors,
                symbolic, other, single, torch.is_grad_enabled())
        d.out_kind = _kind(out)  # for Chain: what a call of these kinds gives
        d.name = fn_name  # the counters' key
        return d

    def __call__(self, args: tuple):
        """The compiled graph's result for these arguments, or MISS when they differ from the capture's."""
        got = self._inputs(args)
        if got is MISS:
            return MISS
        out = self.inner(list(got)) if self.inner is not None else self.compiled(*got)
        return out[0] if self.single else tuple(out)

    def kind_of(self, index: int) -> tuple | None:
        """The kind (_kind) of tensor argument `index` as this call takes it, or None."""
        name = f"L[{self.params[index]!r}]"
        return next((k for n, k in self.open if n == name), None)

    def bind(self, args: tuple, free: int, name: str, out) -> Bound | None:
        """A Bound call for these arguments with args[free] left open, or None: they do not match this
        capture, the graph is called through aot's wrappers, or takes args[free] other than as one input."""
        if self.inner is None or self.symbolic or not isinstance(args[free], torch.Tensor):
            return None
        got = self._inputs(args)
        if got is MISS:
            return None
        slots = [i for i, n in enumerate(self.names) if n.startswith(f"L[{self.params[free]!r}]")]
        if len(slots) != 1 or self.names[slots[0]] != f"L[{self.params[free]!r}]" or slots[0] not in self.shapes:
            return None
        return Bound(self, args, free, list(got), slots[0], name, out)

    def _inputs(self, args: tuple):
        """The graph's inputs gathered from these arguments, or MISS when they differ from the capture's."""
        if len(args) != self.n_args or torch.is_grad_enabled() != self.grad:
            return MISS
        for i, structure in self.other:
            if _structure(args[i]) != structure:
                return MISS
        local = dict(zip(self.params, args, strict=False))
        if self.generation != _generation[0]:
            if any(map(operator.is_not, self.refetch(local), self.fixed)):
                return MISS
            self.generation = _generation[0]
        got = self.gather(local, self.fixed)
        if not self.check(*self.tensors_at(got)[: self.n_tensors]):
            return MISS
        for i in self.symbolic:
            if got[i] < 2:
                return MISS
        return got


class Bound:
    """A direct call with every argument fixed to the objects it was bound with but one tensor.

    A decode step calls an SSM block's graph with the same modules and the same state tensors (updated in
    place) every time; only the activations differ. A Bound keeps the graph's gathered inputs and checks,
    per call, that the other arguments are the same objects (identity), that no module changed its
    parameters since (_generation), the grad mode, and the open tensor's kind (dtype, device, dispatch
    keys, sizes, strides: DirectCall's check). A Chain runs several in a row and checks once.
    """

    def __init__(self, d: DirectCall, args: tuple, free: int, got: list, slot: int, name: str, out):
        from torch._C._dynamo.guards import TensorGuards

        self.inner, self.single, self.grad, self.generation = d.inner, d.single, d.grad, d.generation
        self.same = tuple(a for i, a in enumerate(args) if i != free)  # kept alive while bound, like DirectCall
        self.free, self.got, self.slot, self.name = free, got, slot, name
        sz, st = d.shapes[slot]
        self.check = TensorGuards(args[free], dynamic_dims_sizes=[list(sz)], dynamic_dims_strides=[list(st)]).check
        self.kinds = _kind(args[free]), _kind(out)  # what it takes and gives (for Chain)
        got[slot] = None  # the open input: not kept

    def __call__(self, args: tuple):
        """The graph's result, or MISS when these arguments are not the bound ones."""
        x = args[self.free]
        if (_generation[0] != self.generation or torch.is_grad_enabled() != self.grad or len(args) != len(self.same) + 1
                or not all(map(operator.is_, args[:self.free] + args[self.free + 1:], self.same)) or not self.check(x)):
            return MISS
        got = self.got.copy()
        got[self.slot] = x
        out = self.inner(got)
        _count(self.name, 1)
        return out[0] if self.single else tuple(out)


class Chain:
    """A decode step's layers as compiled calls run back to back, each on the output of the one before, checked
    once a step instead of once a call.

    Two kinds of links: a `Bound` call (a Mamba layer: every argument the same object each step but the
    activations) and an open one, a DirectCall whose other arguments change every step (an attention layer:
    its key and value views, a step's RoPE tables), given per step by the caller. Checked once: _generation
    (replacing any module's parameters or submodules bumps it; the modules were checked when the chain was
    made), the grad mode, the Bound links' other tensors (identity), the first input's kind against the first
    link, and the first open link's arguments as DirectCall checks them (with the step's input standing in
    for the activations: the chain was made only where every link takes and gives activations of one kind).
    The caller vouches that every later open link's arguments are of its first one's kinds (caches alike), so
    they are only gathered; open links run graphs that take the same kinds of inputs besides their weights
    (layers of other weight types run graphs of their own).

    Python's cost around a layer's call is paid after a decode step's weight stream has evicted its code and
    data: ~38 us a layer through a block (module call, DirectCall's gathering and checks), ~13 us for a Bound's
    checks; through a Chain mamba2-130m's step p25 went 8.80 -> 7.63 ms, SmolLM2's 11.90 -> 10.31 (in-process A/B).
    """

    def __init__(self, links: list, chained: int):
        self.calls = tuple((b.inner, b.got, b.slot, None) if isinstance(b, Bound) else (b.inner, None, 0, b)
                           for b in links)
        self.tensors = tuple(o for b in links if isinstance(b, Bound) for o in b.same if isinstance(o, torch.Tensor))
        self.first_bound = next((b for b in links if isinstance(b, Bound)), None)
        self.first_open = next((b for b in links if isinstance(b, DirectCall)), None)
        self.chained = chained
        self.generation, self.grad = _generation[0], links[0].grad
        self.counts = collections.Counter(b.name for b in links)  # calls a step, per graph function

    @classmethod
    def of(cls, links: list, same: tuple, chained: int = 2) -> Chain | None:
        """A Chain of these links (each a Bound, a DirectCall, or None where a layer has neither), or None
        where one is missing, a Bound was bound with other objects than `same` (the Bounds' other arguments,
        in order) or before a change (_generation), a DirectCall calls inductor's entry through aot's
        wrappers, the open links take other kinds of inputs than the first, or activations of one kind do not
        flow through them all. `chained`: the activations' position among an open link's arguments."""
        if not links or any(b is None or not b.single or b.inner is None for b in links):
            return None
        if any(isinstance(b, Bound) and b.generation != _generation[0] for b in links):
            return None
        bound_with = tuple(o for b in links if isinstance(b, Bound) for o in b.same)
        if len(bound_with) != len(same) or not all(map(operator.is_, bound_with, same)):
            return None
        opened = [b for b in links if isinstance(b, DirectCall)]
        if any(d.params != opened[0].params or d.open != opened[0].open for d in opened):
            return None
        kinds = [b.kinds if isinstance(b, Bound) else (b.kind_of(chained), b.out_kind) for b in links]
        if any(k[0] is None or k[0] != k[1] or k != kinds[0] for k in kinds) or any(
                b.grad != links[0].grad for b in links):
            return None
        return cls(links, chained)

    def __call__(self, x: torch.Tensor, tensors: tuple, opens: list[tuple] = ()):
        """The last link's output, or MISS (nothing ran) when something differs from what the chain was made
        with. `tensors`: the tensors among the Bound links' other arguments, in order; `opens`: each open
        link's arguments, in order (their activations are the previous link's output)."""
        if (_generation[0] != self.generation or torch.is_grad_enabled() != self.grad
                or len(tensors) != len(self.tensors) or not all(map(operator.is_, tensors, self.tensors))
                or (self.first_bound is not None and not self.first_bound.check(x))):
            return MISS
        if self.first_open is not None:
            c = self.chained
            if not opens or self.first_open._inputs(opens[0][:c] + (x,) + opens[0][c + 1:]) is MISS:
                return MISS
        opens = iter(opens)
        for inner, got, slot, d in self.calls:
            if d is None:
                args = got.copy()
                args[slot] = x
            else:
                local = dict(zip(d.params, next(opens), strict=False))
                local[d.params[self.chained]] = x
                args = list(d.gather(local, d.fixed))
            x = inner(args)[0]
        for name, n in self.counts.items():
            _count(name, n)
        return x


def _kind(t, sizes: tuple | None = None, strides: tuple | None = None) -> tuple | None:
    """A tensor's dtype, device, sizes, strides (given: with None where symbolic) and inference flag."""
    if not isinstance(t, torch.Tensor):
        return None
    return t.dtype, t.device, sizes or tuple(t.shape), strides or t.stride(), t.is_inference()


def _count(name: str, n: int) -> None:
    compiled_calls[name] = compiled_calls.get(name, 0) + n
    direct_calls[name] = direct_calls.get(name, 0) + n


def _structure(value):
    """What dynamo specializes on in an argument besides tensors: modules by identity, ints, None, nesting."""
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, torch.nn.Module):
        return id(value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_structure(v) for v in value))
    return value


def enable(module: torch.nn.Module, on: bool = True) -> list[int]:
    """Mark the blocks of `module` that live on the CPU to take compiled one-token steps; their indices."""
    if on:
        setup()
    marked = []
    module.compiled_head = bool(on and _on_cpu(getattr(module, "lm_head", None)))
    module.compiled_embed = bool(on and _on_cpu(module.input_embedding()))
    for i, layer in enumerate(module.layers):
        dev = next(layer.parameters()).device
        layer.compiled_step = bool(on and dev.type == "cpu")
        if layer.compiled_step:
            marked.append(i)
        for sub in layer.modules():
            if hasattr(sub, "keep_decode_A"):  # Mamba-1: A computed once, not in every step's graph
                sub.keep_decode_A(layer.compiled_step)
    _bump()  # Bound calls and Chains made before serve no more
    return marked


def _on_cpu(mod: torch.nn.Module | None) -> bool:
    tensors = [*mod.parameters(), *mod.buffers()] if mod is not None else []
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def warm_up(m) -> None:
    """Compile a LoadedModel's graphs now rather than at its first token: decode steps on a scratch
    cache, at two KV lengths and two KV capacities, so the graphs generalize over both now, not mid-chat."""
    cache = m.make_cache(1)
    one = torch.zeros(1, 1, dtype=torch.long)
    m.forward(torch.zeros(1, 2, dtype=torch.long), cache)  # a KV length of 1 would be specialized
    m.forward(one, cache)
    with torch.inference_mode():  # token ids made under inference mode (the server's worker) are another kind
        m.forward(torch.zeros(1, 1, dtype=torch.long), cache)
    with torch.inference_mode():  # as forward() allocates: the graphs guard on tensor kind
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(c.capacity + 1)
    m.forward(one, cache)
    _warm_experts(m.module)


def _warm_experts(module: torch.nn.Module) -> None:
    """Run each 4-bit expert of the CPU MoE layers through its compiled graph once (runtime/layers.py
    moe_expert), with inputs of the kinds a decode step passes: its direct call is then captured now, not
    at the expert's first use mid-chat (a call through dynamo: ~0.2 ms each, 32 in jamba-small)."""
    from runtime.layers import MoE, moe_expert

    for layer in module.layers:
        if not getattr(layer, "compiled_step", False):
            continue
        for moe in (sub for sub in layer.modules()
                    if isinstance(sub, MoE) and hasattr(sub, "q1") and not sub.routes_by_id()):
            with torch.inference_mode():  # the tensor kind a decode step passes (the direct call checks it)
                x = torch.zeros(1, moe.q1[0].in_features, device=moe.gate.weight.device)
                if not moe.routes_on_host(x):
                    continue
                weight = torch.ones(1, moe.top_k)[:, :1]  # a column of the routing weights, as in a step
                for e in range(moe.n_experts):
                    moe_expert(moe.q1[e], moe.q3[e], moe.q2[e], x, weight)


def compile_model(m, on: bool = True, warm: bool = True) -> tuple[str | None, float]:
    """Turn compiled one-token steps on (or off) for a LoadedModel's CPU layers, warming up when `warm`.

    Returns (why compilation is off or failed, None when compiled code runs; seconds spent warming up).
    """
    why = unavailable() if on else "turned off"
    if not enable(m.module, on and why is None):
        return why or "no layer on the CPU", 0.0
    seconds = 0.0
    if warm:
        t0 = time.perf_counter()
        warm_up(m)
        seconds = time.perf_counter() - t0
    if failures:
        return "; ".join(f"{k}: {v}" for k, v in failures.items()), seconds
    return None, seconds
