"""The search space: per optimization a few settings from its range, pruned before anything is measured.

Each registered optimization is one :class:`Dimension` whose :class:`Choice` s are a few values of its knobs
(``deepcache.interval`` 2..5, ``cfg_cutoff.fraction`` 0.5..0.9, the half-precision dtypes this device computes
fast, ...), plus the implicit choice of leaving it out. A :class:`Candidate` takes at most one choice per
dimension; its recipe lists them in one canonical order with the ``last`` optimizations (compile, openvino) at
the end, so the recipe validation's order rule always holds. Pruning, in order:

- ``--include`` / ``--exclude``, and the opt-in optimizations that change the workload (sampler, accelerator), are
  not speed-ups (freeu) or cost minutes per candidate (compile, openvino): searched only when named;
- the workflow (the bench measures txt2img): ``unsupported`` / ``no_effect`` there, or settings that make an
  optimization stand aside (fewer steps than the caches' ``min_steps``, CFG off, one image per call);
- each choice's requirements on this machine (``Optimization.requirements``: CUDA, packages, files);
- pairs that recipe validation refuses (``conflicts`` and the setting-dependent ``clashes``);
- candidates whose estimated memory is well over the budget (:mod:`.estimate`, in the search).

A candidate's key is its recipe with every default spelled out, tables sorted by name: the same recipe written
two ways (a preset and a grid point) is measured once, and the resume log is keyed by it.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from diffspeed.core.recipe import describe_tables

# canonical order of a candidate's tables (names not listed go before the ``last`` ones, alphabetically)
ORDER = ("precision", "quantize", "attention", "channels_last", "sampler", "accelerator", "deepcache", "tgate",
         "tome", "hypertile", "cfg_cutoff", "freeu", "vae_slicing", "vae_tiling", "tiny_vae", "staged", "offload")
OPT_IN = {"sampler": "it changes the sampler and steps you fixed with --steps/--sampler",
          "accelerator": "it changes the steps, CFG and sampler (a step-distilled LoRA)",
          "freeu": "a quality tweak, not a speed-up",
          "compile": "its compile takes minutes per candidate",
          "openvino": "its export takes minutes per candidate"}
WORKFLOW = "txt2img"


@dataclass(frozen=True)
class Choice:
    """One setting of one optimization: ``table`` as a recipe file writes it (only the fields set here)."""

    name: str
    table: dict
    key: str  # canonical: every field, defaults included

    @property
    def label(self) -> str:
        return describe_tables([self.table])

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Candidate:
    """A recipe to measure: ``choices`` in canonical order; ``source`` says where it came from."""

    key: str
    choices: tuple[Choice, ...]
    source: str = "search"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Candidate) and other.key == self.key

    @property
    def tables(self) -> list[dict]:
        return [dict(c.table) for c in self.choices]

    @property
    def label(self) -> str:
        return describe_tables(self.tables) or "baseline"

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.choices)

    def recipe_dict(self, name: str = "", description: str = "") -> dict:
        out = {"name": name} if name else {}
        if description:
            out["description"] = description
        return out | {"optimization": self.tables}


def choice(name: str, **fields) -> Choice:
    """A validated :class:`Choice` (the config's own checks run here)."""
    from diffspeed.core.optimization import get_optimization

    config = get_optimization(name).Config(**fields)
    return Choice(name, {"name": name, **fields}, canonical_table(config.to_dict()))


def canonical_table(table: dict) -> str:
    return json.dumps({k: v for k, v in table.items() if v is not None}, sort_keys=True, separators=(",", ":"))


def order_key(name: str, known: dict) -> tuple:
    last = bool(getattr(known.get(name), "last", False))
    return (last, ORDER.index(name) if name in ORDER else len(ORDER), name)


def candidate_of(choices: Iterable[Choice], source: str = "search", *, keep_order: bool = False) -> Candidate:
    """The candidate of ``choices`` (canonical order unless ``keep_order``: a preset keeps its own)."""
    from diffspeed.core.optimization import all_optimizations

    known = all_optimizations()
    choices = tuple(choices) if keep_order else tuple(sorted(choices, key=lambda c: order_key(c.name, known)))
    key = "[" + ",".join(sorted(c.key for c in choices)) + "]"
    return Candidate(key, choices, source)


def candidate_from_tables(tables: list[dict], source: str) -> Candidate:
    """Recipe tables as written (a preset's) as a candidate, their order kept; each validated."""
    from diffspeed.core.optimization import get_optimization

    out = []
    for t in tables:
        config = get_optimization(t["name"]).Config(**{k: v for k, v in t.items() if k != "name"})
        out.append(Choice(t["name"], dict(t), canonical_table(config.to_dict())))
    return candidate_of(out, source, keep_order=True)


BASELINE = Candidate("[]", (), "baseline")


@dataclass(frozen=True)
class Space:
    dimensions: tuple[Dimension, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (optimization or choice, why it is not searched)
    incompatible: frozenset = field(default_factory=frozenset)  # frozensets {choice key, choice key}

    def size(self) -> int:
        """Grid points before pair pruning, the baseline included."""
        n = 1
        for d in self.dimensions:
            n *= len(d.choices) + 1
        return n

    def compatible(self, a: Choice, b: Choice) -> bool:
        return frozenset((a.key, b.key)) not in self.incompatible

    def valid(self, choices: Iterable[Choice]) -> bool:
        chosen = list(choices)
        return all(self.compatible(a, b) for a, b in itertools.combinations(chosen, 2))

    def singles(self) -> list[Candidate]:
        """Every choice alone: the main effects."""
        return [candidate_of([c], "single") for d in self.dimensions for c in d.choices]

    def enumerate(self, limit: int = 200_000) -> Iterator[tuple[int, ...]]:
        """Every valid grid point as choice indices per dimension (0 = left out, i = ``choices[i - 1]``),
        depth first with pair pruning; at most ``limit``."""
        dims = self.dimensions
        picked: list[Choice] = []
        count = 0

        def walk(i: int, idx: tuple[int, ...]):
            nonlocal count
            if count >= limit:
                return
            if i == len(dims):
                count += 1
                yield idx
                return
            yield from walk(i + 1, idx + (0,))
            for j, c in enumerate(dims[i].choices, 1):
                if all(self.compatible(c, p) for p in picked):
                    picked.append(c)
                    yield from walk(i + 1, idx + (j,))
                    picked.pop()

        yield from walk(0, ())

    def of_indices(self, idx: tuple[int, ...], source: str = "search") -> Candidate:
        return candidate_of([d.choices[j - 1] for d, j in zip(self.dimensions, idx) if j], source)

    def indices(self, cand: Candidate) -> tuple[int, ...] | None:
        """The grid indices of ``cand``; None when one of its tables is not a grid choice (a preset's)."""
        by = {c.key: (i, j) for i, d in enumerate(self.dimensions) for j, c in enumerate(d.choices, 1)}
        idx = [0] * len(self.dimensions)
        for c in cand.choices:
            if c.key not in by:
                return None
            i, j = by[c.key]
            idx[i] = j
        return tuple(idx)

    def sample(self, rng: random.Random, n: int, tries: int = 20) -> list[tuple[int, ...]]:
        """Up to ``n`` valid grid points drawn uniformly per dimension (rejecting invalid pairs)."""
        out = []
        for _ in range(n * tries):
            if len(out) >= n:
                break
            idx = tuple(rng.randrange(len(d.choices) + 1) for d in self.dimensions)
            if self.valid(d.choices[j - 1] for d, j in zip(self.dimensions, idx) if j):
                out.append(idx)
        return out

    def neighbours(self, idx: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Valid grid points one dimension away from ``idx``."""
        out = []
        for i, d in enumerate(self.dimensions):
            for j in range(len(d.choices) + 1):
                if j != idx[i]:
                    new = idx[:i] + (j,) + idx[i + 1:]
                    if self.valid(dd.choices[k - 1] for dd, k in zip(self.dimensions, new) if k):
                        out.append(new)
        return out

    def describe(self) -> dict:
        valid = sum(1 for _ in self.enumerate(200_001))
        return {"dimensions": {d.name: [c.label for c in d.choices] for d in self.dimensions},
                "skipped": [{"name": n, "why": w} for n, w in self.skipped], "grid_points": self.size(),
                "valid_points": valid if valid <= 200_000 else None, "incompatible_pairs": len(self.incompatible)}


# ------------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class Context:
    """What the choices depend on: the device, its fast dtypes, the workload."""

    device: str = "cpu"  # cpu | cuda...
    fast_dtypes: tuple[str, ...] = ("fp32",)  # compute dtypes at least as fast as fp32 here (hardware.fast_dtypes)
    load_dtype: str = "fp32"
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str | None = "DPM++ 2M"
    cfg: float | None = None
    model: str = "tiny-sd"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def _precision(ctx: Context) -> list[dict]:
    out = []
    for d in ("fp16", "bf16"):
        if d in ctx.fast_dtypes and d != ctx.load_dtype:
            out.append({"unet": d, "text_encoder": d, "vae": d} if ctx.cuda else
                       {"unet": d, "vae": d, "originals": "disk"})  # the cpu-bf16 presets' form
    if not ctx.cuda and "bf16" not in ctx.fast_dtypes and ctx.load_dtype == "fp32":
        out.append({"unet": "bf16", "vae": "bf16", "compute": "fp32", "originals": "disk"})  # memory only
    return out


def _tiles(ctx: Context, smallest: int) -> list[int]:
    edge = min(ctx.width, ctx.height)
    return sorted({t for t in (edge // 2 // 8 * 8, edge // 4 // 8 * 8) if t >= smallest})


def grid(name: str, ctx: Context) -> tuple[list[dict], str]:
    """(the settings tried for optimization ``name`` here, why none when empty)."""
    few_steps = ctx.steps < 10
    table = {
        "precision": lambda: _precision(ctx),
        "quantize": lambda: [{"method": "fp8", "components": "unet"}, {"method": "int8_weight_only"}],
        "attention": lambda: [{"backend": "sliced"}] + ([{"backend": "xformers"}] if ctx.cuda else []),
        "channels_last": lambda: [{}],
        "deepcache": lambda: [] if few_steps else [{"interval": k} for k in (2, 3, 4, 5)],
        "tgate": lambda: [] if few_steps else [{"gate_fraction": f} for f in (0.4, 0.6)],
        "cfg_cutoff": lambda: [] if ctx.cfg is not None and ctx.cfg <= 1 else
        [{"fraction": f} for f in (0.5, 0.7, 0.9)],
        "tome": lambda: [{"ratio": r} for r in (0.3, 0.5)],
        "hypertile": lambda: [{"tile_size": t} for t in _tiles(ctx, 16)],
        "vae_tiling": lambda: [{"tile_size": t} for t in _tiles(ctx, 32)[-1:]],
        "vae_slicing": lambda: [],
        "tiny_vae": lambda: [{}] if ctx.model in ("tiny-sd", "tiny-sdxl") else [],
        "staged": lambda: [{}],
        "offload": lambda: [{"mode": "model"}, {"mode": "sequential"}] if ctx.cuda else [],
        "sampler": lambda: [{"sampler": ctx.sampler or "DPM++ 2M", "steps": s}
                            for s in sorted({max(1, round(ctx.steps * f)) for f in (0.5, 0.75)}) if s < ctx.steps],
        "accelerator": lambda: [{"method": "lcm"}],
        "freeu": lambda: [{}],
        "compile": lambda: [{}, {"regional": True}],
        "openvino": lambda: [{}, {"regional": True}],
    }
    why = {"deepcache": "fewer than 10 steps: it stands aside (min_steps)",
           "tgate": "fewer than 10 steps: it stands aside (min_steps)",
           "cfg_cutoff": "CFG scale <= 1: there is no guidance to cut",
           "hypertile": "the image is smaller than two of its smallest tiles",
           "vae_tiling": "the image is smaller than two of its smallest tiles",
           "vae_slicing": "the bench generates one image per call: slicing a batch of one changes nothing",
           "tiny_vae": "its shipped VAE is the tiny models' own; for this model give tiny_vae.path in a recipe",
           "offload": "needs a CUDA device",
           "sampler": "fewer steps than it would try"}
    if name not in table:
        return [], "not known to the tuner (a plugin's): give it in a recipe"
    values = table[name]()
    return values, ("" if values else why.get(name, "nothing to try here"))


def build_space(ctx: Context, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Space:
    """The space of every registered optimization for ``ctx``, pruned as the module docstring says."""
    from diffspeed.core import Recipe
    from diffspeed.core.optimization import all_optimizations

    known = all_optimizations()
    dims, skipped = [], []
    for name in sorted(known, key=lambda n: order_key(n, known)):
        cls = known[name]
        if include and name not in include:
            continue
        if name in exclude:
            skipped.append((name, "--exclude"))
            continue
        if name in OPT_IN and name not in include:
            skipped.append((name, f"opt-in ({OPT_IN[name]}): --include {name} to search it"))
            continue
        if WORKFLOW in cls.unsupported or WORKFLOW in cls.no_effect:
            skipped.append((name, cls.unsupported.get(WORKFLOW) or cls.no_effect[WORKFLOW]))
            continue
        values, why = grid(name, ctx)
        choices = []
        for fields in values:
            try:
                c = choice(name, **fields)
            except Exception as err:  # noqa: BLE001 -- a value its config refuses here is skipped, with why
                skipped.append((describe_tables([{"name": name, **fields}]), str(err)))
                continue
            problems = Recipe.of(cls.Config(**fields)).check(workflow=WORKFLOW)
            if problems:
                skipped.append((c.label, "; ".join(problems)))
            else:
                choices.append(c)
        if choices:
            dims.append(Dimension(name, tuple(choices)))
        elif why:
            skipped.append((name, why))
    return Space(tuple(dims), tuple(skipped), _incompatible(dims, known))


def _incompatible(dims: list[Dimension], known: dict) -> frozenset:
    """Pairs of choices that recipe validation refuses together (conflicts, clashes)."""
    out = set()
    for da, db in itertools.combinations(dims, 2):
        for a, b in itertools.product(da.choices, db.choices):
            if _pair_problems(a, b, known):
                out.add(frozenset((a.key, b.key)))
    return frozenset(out)


def _pair_problems(a: Choice, b: Choice, known: dict) -> list[str]:
    ca, cb = (known[c.name].Config(**{k: v for k, v in c.table.items() if k != "name"}) for c in (a, b))
    problems = [f"{a.name} conflicts with {b.name}"] if (b.name in known[a.name].conflicts
                                                         or a.name in known[b.name].conflicts) else []
    if known[a.name].last and known[b.name].last:
        problems.append(f"{a.name} and {b.name} both must be last")
    return problems + known[a.name].clashes(ca, {b.name: cb}) + known[b.name].clashes(cb, {a.name: ca})
