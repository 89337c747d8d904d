"""Recorded changes: every edit an optimization makes pushes its own undo step.

``Edits.undo()`` replays the steps in reverse, so the pipeline ends bit-for-bit as it was: same tensors, same
attention processor objects, same attributes (absent ones deleted again), same ``forward``, same hooks.

Changes that live for one call (a hook that counts one pass, a ControlNet's wrappers) go into a
:meth:`Edits.child` record: the child is undone when the call ends -- in a ``finally``, so a call that fails
half-way leaves nothing behind -- and, as a step of its parent, again (a no-op by then) by ``remove()``.
Per-call bookkeeping inside a hook (``around``'s pending outputs) is cleared by :meth:`Edits.end_call`, so a
call aborted between a pre-hook and its post-hook leaves no stale entry for the next call to trip over.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffspeed._lazy import lazy_import
from diffspeed.core.spill import make_spill_dir, remove_spill_dir
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")

_MISSING = object()


class Edits:
    def __init__(self, owner: str = "optimization"):
        self.owner = owner
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._call_end: list[Callable[[], None]] = []  # per-call bookkeeping to clear when a call ends
        # what the edits changed, by kind ("attributes set", "methods wrapped", "hooks", "attention processors
        # swapped", "tensors changed"): the effect an optimization reports (values that were already so, and
        # tensors a cast left alone, are not counted)
        self.counts: Counter = Counter()

    def __len__(self) -> int:
        return len(self._undo)

    def __repr__(self) -> str:
        return f"Edits({self.owner!r}: {', '.join(what for what, _ in self._undo) or 'nothing'})"

    def record(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def undo(self) -> None:
        self.end_call()
        while self._undo:
            _, step = self._undo[-1]
            step()  # if it raises, the step stays recorded and undo() can be retried
            self._undo.pop()

    def child(self, what: str) -> Edits:
        """A separate record for changes with a shorter life (one call, one pass); undoing this record undoes
        the child too, so whatever the child still holds cannot outlive its parent."""
        sub = Edits(f"{self.owner} ({what})")
        self.record(what, sub.undo)
        return sub

    def on_call_end(self, clear: Callable[[], None]) -> None:
        """Run ``clear`` whenever a call ends (normally or not): per-call bookkeeping of a recorded hook."""
        self._call_end.append(clear)

    def end_call(self) -> None:
        for clear in self._call_end:
            clear()

    # ------------------------------------------------------------------------------------------ edits
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that restores the old value, or deletes the attribute if it was not set on ``obj``."""
        own = name in getattr(obj, "__dict__", {}) or _is_submodule_slot(obj, name)
        old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)
        if not _same(old, value):
            self.counts["attributes set"] += 1

        def undo():
            if own:
                setattr(obj, name, old)
                return
            try:
                delattr(obj, name)  # it lived on the class (or nowhere): drop the instance attribute
            except AttributeError:
                pass
            if old is not _MISSING and not _same(getattr(obj, name, _MISSING), old):
                setattr(obj, name, old)  # a property-like attribute (torch flags): set the old value back

        self.record(f"set {type(obj).__name__}.{name}", undo)

    def wrap_method(self, obj: Any, name: str, wrapper: Callable[..., Any]) -> Callable[..., Any]:
        """Make ``obj.<name>(*a, **k)`` call ``wrapper(inner, *a, **k)`` for this instance only.

        The class is untouched; the wrapper lives in the instance ``__dict__``. Undo checks that nothing was
        wrapped on top of it since, because unwrapping out of order would silently drop the later wrapper.
        """
        cell = [getattr(obj, name)]  # what the wrapper calls; wrap_beneath may swap it

        @functools.wraps(cell[0])
        def wrapped(*args, **kwargs):
            return wrapper(cell[0], *args, **kwargs)

        wrapped.__diffspeed_inner__ = cell
        self.set_attr(obj, name, wrapped)
        set_undo = self._undo.pop()[1]
        self.counts["attributes set"] -= 1
        self.counts["methods wrapped"] += 1

        def undo():
            if getattr(obj, name) is not wrapped:
                raise DiffspeedError(f"{self.owner}: {type(obj).__name__}.{name} was wrapped again after it; "
                                     f"remove optimizations in the reverse order of applying them")
            set_undo()

        self.record(f"wrap {type(obj).__name__}.{name}", undo)
        return wrapped

    def wrap_beneath(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> Callable:
        """Replace the innermost ``obj.<name>`` -- the method itself, beneath any wrappers that optimizations
        applied before put on top (:meth:`wrap_method`) -- with ``make(method)``. The wrappers keep running
        (a cache's decision to skip a block stays eager Python) and only the method's own work is replaced:
        how ``compile`` and ``openvino`` compile a block another optimization also wraps. Returns what
        ``make`` built; undo puts the method back."""
        current = getattr(obj, name)
        cell = getattr(current, "__diffspeed_inner__", None)
        if cell is None:
            new = make(current)
            self.set_attr(obj, name, new)
            self.counts["attributes set"] -= 1
            self.counts["methods wrapped"] += 1
            return new
        while hasattr(cell[0], "__diffspeed_inner__"):
            cell = cell[0].__diffspeed_inner__
        old = cell[0]
        cell[0] = new = make(old)
        self.counts["methods wrapped"] += 1

        def undo():
            if cell[0] is not new:
                raise DiffspeedError(f"{self.owner}: {type(obj).__name__}.{name} was replaced again beneath its "
                                     f"wrappers; remove optimizations in the reverse order of applying them")
            cell[0] = old

        self.record(f"beneath {type(obj).__name__}.{name}", undo)
        return new

    def forward_pre_hook(self, module: torch.nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self.counts["hooks"] += 1
        self.record(f"pre-hook on {type(module).__name__}", handle.remove)

    def forward_hook(self, module: torch.nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self.counts["hooks"] += 1
        self.record(f"hook on {type(module).__name__}", handle.remove)

    def around(self, module: torch.nn.Module, before: Callable) -> None:
        """Change ``module``'s first input before it runs and map its output back afterwards.

        ``before(x, kwargs)`` gets the first input (positional or ``hidden_states=``) and returns None to
        leave this call alone, or ``(new_x, after)``: ``new_x`` is passed on and ``after(output)`` gives the
        output the caller sees. Calls are matched last-in first-out, so nested or repeated calls pair up.
        """
        pending: list = []

        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            job = before(x, kwargs)
            pending.append(None if job is None else job[1])
            if job is None:
                return None
            return ((job[0], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": job[0]})

        def post(mod, args, out):
            after = pending.pop()
            return None if after is None else after(out)

        self.forward_pre_hook(module, pre, with_kwargs=True)
        self.forward_hook(module, post)
        self.on_call_end(pending.clear)  # a call that failed between pre and post must not leave its entry

    def set_attn_processors(self, model: torch.nn.Module, processors) -> None:
        """Swap a diffusers model's attention processors; undo puts the very same objects back."""
        old = dict(model.attn_processors)
        model.set_attn_processor(processors)
        self.counts["attention processors swapped"] += sum(
            p is not old.get(k) and type(p) is not type(old.get(k)) for k, p in model.attn_processors.items())
        self.record(f"attention processors of {type(model).__name__}", lambda: model.set_attn_processor(old))

    def retensor(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], *,
                 spill_dir: str | Path | None = None) -> None:
        """Apply ``fn`` to every parameter and buffer, keeping the original tensors so undo restores them
        exactly (a dtype round trip fp32 -> fp16 -> fp32 would not): see :meth:`set_tensors`. Each tensor is
        converted as its turn comes, so with ``spill_dir`` the originals' memory is given back as the cast goes,
        never held twice."""
        def changed():
            for t in [*module.parameters(), *module.buffers()]:
                new = fn(t.data)
                if new is not t.data:
                    yield t, new

        self.set_tensors(changed(), spill_dir=spill_dir, what=f"tensors of {type(module).__name__}")

    def set_tensors(self, changes, *, spill_dir: str | Path | None = None, what: str = "tensors") -> None:
        """Give each parameter or buffer of ``changes`` ((tensor, new value) pairs, consumed one at a time) its
        new value as it is, keeping the originals so undo restores them exactly: in host memory, or with
        ``spill_dir`` in a folder of files there (``torch.save`` round-trips bits and strides), one per tensor,
        written as each is replaced."""
        # named for this pid: removed on exit and SIGTERM, swept by the next process if this one is killed
        spill = make_spill_dir(spill_dir) if spill_dir else None
        saved = []
        try:
            for t, new in changes:
                device = t.data.device
                original = t.data.to("cpu")  # on the CPU: the original tensor itself
                if spill is not None:
                    torch.save(original, spill / f"{len(saved)}.pt")
                    original = None
                saved.append((t, original, device))
                t.data = new
        except BaseException:
            _restore(saved, spill)
            raise
        self.counts["tensors changed"] += len(saved)
        self.record(what + (f" (originals in {spill})" if spill else ""), lambda: _restore(saved, spill))


def _restore(saved: list, spill: Path | None) -> None:
    for i in reversed(range(len(saved))):
        t, original, device = saved[i]
        if spill is not None:
            original = torch.load(spill / f"{i}.pt", weights_only=True)
        t.data = original.to(device)
    if spill is not None:
        remove_spill_dir(spill)


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # tensors and other objects without a plain truth value
        return False


def _is_submodule_slot(obj: Any, name: str) -> bool:
    return isinstance(obj, torch.nn.Module) and (name in obj._modules or name in obj._parameters
                                                 or name in obj._buffers)
