"""The one abstraction: a frozen, keyword-only, validated config plus an object with apply/remove/reset.

Each optimization file defines ``XConfig(OptConfig)`` (fields made with :func:`param`, which carry their help
text, range or choices) and ``X(Optimization)``, registered under one name used everywhere: Python, CLI,
recipe files and the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from diffspeed.core.edits import Edits
from diffspeed.core.state import RunState
from diffspeed.errors import DiffspeedError

REGISTRY: dict[str, type[Optimization]] = {}


def param(default: Any, help: str, *, range: tuple | None = None, choices: tuple | None = None,
          kind: type | None = None, nullable: bool = False):
    """A config field: ``help`` says units and sensible values; ``range`` is inclusive."""
    kind = kind or type(default)
    return dataclasses.field(default=default, metadata={
        "help": help, "range": range, "choices": choices, "kind": kind, "nullable": nullable or default is None})


def _field_problem(prefix: str, f: dataclasses.Field, value: Any) -> str | None:
    m = f.metadata
    name = f"{prefix}.{f.name}"
    if value is None:
        return None if m.get("nullable") else f"{name} must not be empty"
    kind = m.get("kind", object)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        return f"{name} must be a {kind.__name__}, got {value!r}"
    if m.get("choices") is not None and value not in m["choices"]:
        return f"{name} must be one of {', '.join(map(str, m['choices']))}; got {value!r}"
    if m.get("range") is not None:
        lo, hi = m["range"]
        if not lo <= value <= hi:
            return f"{name} must be in [{lo}, {hi}], got {value!r}"
    return None


@dataclass(frozen=True, kw_only=True)
class OptConfig:
    """Base of every optimization config. Subclasses set ``name`` and may add cross-field ``checks``."""

    name: ClassVar[str] = ""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise DiffspeedError("; ".join(p for _, p in problems), field=problems[0][0])

    def problems(self) -> list[tuple[str, str]]:
        """Every (field, message) that is wrong with this config, not just the first."""
        out = []
        for f in dataclasses.fields(self):
            msg = _field_problem(self.name, f, getattr(self, f.name))
            if msg:
                out.append((f.name, msg))
        if not out:
            out.extend(self.checks())
        return out

    def checks(self) -> list[tuple[str, str]]:
        """Cross-field rules; return (field, message) pairs."""
        return []

    def to_dict(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def describe(cls) -> list[dict]:
        return [{"field": f.name, "default": f.default, "help": f.metadata.get("help", ""),
                 "range": f.metadata.get("range"), "choices": f.metadata.get("choices"),
                 "type": f.metadata.get("kind", object).__name__} for f in dataclasses.fields(cls)]


class Optimization:
    """Base class. Subclasses implement ``_apply(pipe, state, edits)`` and, if stateful, ``_reset()``.

    Class attributes declare what recipe validation needs: ``conflicts`` (other name -> reason),
    ``last`` (must come after every other optimization, e.g. compile), ``stateful``, and per workflow
    (see :data:`WORKFLOWS`) ``unsupported`` (workflow -> why validation rejects the combination) and
    ``no_effect`` (workflow -> why it runs but changes nothing there). The compatibility matrix in
    docs/compatibility.md is generated from these (``diffspeed optimizations --matrix``).
    """

    Config: ClassVar[type[OptConfig]]
    summary: ClassVar[str] = ""
    conflicts: ClassVar[dict[str, str]] = {}
    unsupported: ClassVar[dict[str, str]] = {}
    no_effect: ClassVar[dict[str, str]] = {}
    last: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    # stats keys (see RunState.stats) of which at least one must be > 0 after a call, or the optimization did nothing
    # for that call (a cache never hit, no token merged): the effect check (Accelerated, strict) reports it
    call_effect: ClassVar[tuple[str, ...]] = ()
    # why it does nothing on some calls by design (an image smaller than a tile, a call without guidance): such a
    # call is noted ("no effect", with this reason) but never raises; "" = a call it did nothing for is a silent
    # no-op. A call can also say so at run time: ``state.stats["stood_aside:NAME"] = 1`` with an event (the
    # caching optimizations' few-step guard)
    stands_aside: ClassVar[str] = ""
    noop: ClassVar[dict] = {}  # config fields that make it change nothing (contract tests use it)
    example: ClassVar[dict] = {}  # an active config for tests and documentation

    def __init__(self, config: OptConfig | None = None, **fields: Any):
        if config is None:
            config = self.Config(**fields)
        elif fields:
            raise TypeError("give a config or fields, not both")
        if not isinstance(config, self.Config):
            raise DiffspeedError(f"{self.name} needs a {self.Config.__name__}, got {type(config).__name__}",
                                 field=self.name)
        self.config = config
        self._edits: Edits | None = None
        self._per_call: Edits | None = None
        self.stood_aside = ""  # set by _apply when changing nothing here is deliberate (it says why)
        self.pipe = None
        self.state: RunState | None = None

    @property
    def name(self) -> str:
        return self.Config.name

    @property
    def applied(self) -> bool:
        return self._edits is not None

    def apply(self, pipe, state: RunState | None = None) -> Optimization:
        if self.applied:
            raise DiffspeedError(f"{self.name} is already applied; remove() it before applying again",
                                 field=self.name)
        problems = self.requirements(self.config, pipe)
        if problems:
            raise DiffspeedError(f"{self.name}: {'; '.join(problems)}", field=self.name)
        edits = Edits(self.name)
        self.pipe, self.state = pipe, state if state is not None else RunState()
        try:
            self._per_call = edits.child("this call")
            self._apply(pipe, self.state, edits)
        except BaseException:
            edits.undo()
            self.pipe = self.state = self._per_call = None
            raise
        self._edits = edits
        return self

    def remove(self) -> None:
        if not self.applied:
            raise DiffspeedError(f"{self.name} is not applied", field=self.name)
        self.end_call()  # per-call changes sit on top of the applied ones: they go first
        self._edits.undo()
        self._edits = self._per_call = None
        self.reset()
        self.pipe = self.state = None

    def effect(self) -> dict[str, int]:
        """What applying changed on this pipeline, by kind (attributes set, methods wrapped, hooks, attention
        processors swapped, tensors changed), plus what the optimization reports itself (``self.changes``,
        e.g. call defaults); empty when it changed nothing."""
        if self._edits is None:
            return {}
        counts = dict(self._edits.counts) | dict(getattr(self, "changes", {}) or {})
        return {k: v for k, v in counts.items() if v > 0}

    def call_no_effect(self, stats) -> tuple[str, bool] | None:
        """(why, deliberate) when the last call ran without this optimization doing anything (its
        ``call_effect`` stats all zero); None when it acted, or when it declares no per-call stats.
        ``deliberate``: it stands aside on such calls by design (``stands_aside``) or said so at run time."""
        if not self.call_effect or any(stats.get(k, 0) > 0 for k in self.call_effect):
            return None
        why = f"{self.name}: no effect on this call ({' and '.join(self.call_effect)} stayed 0"
        if stats.get(f"stood_aside:{self.name}", 0):
            return why + "; it stood aside, see its note)", True
        if self.stands_aside:
            return why + f"; by design: {self.stands_aside})", True
        return why + ")", False

    @property
    def call_edits(self) -> Edits:
        """The record for changes that live for the current call only (hooks that count one pass, wrappers
        around a ControlNet): undone by :meth:`end_call` -- which ``Accelerated`` runs in a ``finally`` --, by
        :meth:`reset` before the next call, and by ``remove()``."""
        if self._per_call is None:
            raise DiffspeedError(f"{self.name} is not applied", field=self.name)
        return self._per_call

    def end_call(self) -> None:
        """The call is over (returned or raised): drop every per-call change and per-call hook bookkeeping."""
        if self._per_call is not None:
            self._per_call.undo()
        if self._edits is not None:
            self._edits.end_call()

    def reset(self) -> None:
        """Forget per-call state (caches, counters); called before every generation."""
        self.end_call()  # a call made without Accelerated (pipe(...) directly) may have failed half-way
        self._reset()

    # ------------------------------------------------------------------------------------ to override
    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        pass

    def wrap_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """Optionally change how the pipeline is called (defaults, or the whole call for staged runs)."""
        return call

    @classmethod
    def clashes(cls, config: OptConfig, others: dict[str, OptConfig]) -> list[str]:
        """Conflicts that depend on settings (``others``: the recipe's other configs by name), as messages
        naming the field to change; the name-only ones are in ``conflicts``. Default: none."""
        return []

    @classmethod
    def requirements(cls, config: OptConfig, pipe=None) -> list[str]:
        """Unmet requirements (hardware, packages, pipeline parts); empty when it can run here."""
        return []


# every workflow an optimization must work on (or be rejected on, with a reason)
WORKFLOWS: dict[str, str] = {
    "txt2img": "text to image",
    "img2img": "image to image (init image, denoising strength)",
    "inpaint": "inpainting (init image + mask)",
    "hires": "hires fix (first pass, upscale, img2img second pass)",
    "lora": "any of the above with LoRAs loaded (unfused)",
    "controlnet": "txt2img with a ControlNet",
    "refiner": "SDXL base + refiner (the recipe applies to the base)",
}


def compatibility(cls: type[Optimization], workflow: str) -> tuple[str, str]:
    """("yes" | "no effect" | "rejected", reason) for ``cls`` on ``workflow``."""
    if workflow in cls.unsupported:
        return "rejected", cls.unsupported[workflow]
    if workflow in cls.no_effect:
        return "no effect", cls.no_effect[workflow]
    return "yes", ""


def compatibility_matrix(document: bool = False) -> str:
    """The optimization x workflow matrix as markdown, generated from the classes' declarations
    (``document``: with the title and the workflow legend, as docs/compatibility.md holds it)."""
    if document:
        return ("# Compatibility: optimizations x workflows\n\nGenerated by `diffspeed optimizations --matrix` "
                "from each optimization's `unsupported` / `no_effect` declarations; do not edit by hand.\n\n"
                + "\n".join(f"- **{k}**: {v}" for k, v in WORKFLOWS.items()) + "\n\n" + compatibility_matrix())
    opts = all_optimizations()
    lines = ["| optimization | " + " | ".join(WORKFLOWS) + " |", "|---|" + "---|" * len(WORKFLOWS)]
    notes = []
    for name in sorted(opts):
        cells = []
        for wf in WORKFLOWS:
            verdict, reason = compatibility(opts[name], wf)
            if reason:
                notes.append(f"{name} / {wf}: {reason}")
                cells.append(f"{verdict} [{len(notes)}]")
            else:
                cells.append(verdict)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def register(cls: type[Optimization]) -> type[Optimization]:
    name = cls.Config.name
    if not name or name in REGISTRY:
        raise RuntimeError(f"optimization name {name!r} is empty or taken")
    REGISTRY[name] = cls
    return cls


def get_optimization(name: str) -> type[Optimization]:
    import diffspeed.optim  # noqa: F401  (registers every optimization)

    try:
        return REGISTRY[name]
    except KeyError:
        raise DiffspeedError(f"unknown optimization {name!r}; known: {', '.join(sorted(REGISTRY))}",
                             field="name") from None


def all_optimizations() -> dict[str, type[Optimization]]:
    import diffspeed.optim  # noqa: F401

    return dict(REGISTRY)
