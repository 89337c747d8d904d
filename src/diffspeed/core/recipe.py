"""Recipes: an ordered list of optimization configs, stored as TOML or JSON, checked before anything runs.

TOML::

    name = "fast-cpu"
    [[optimization]]
    name = "cfg_cutoff"
    fraction = 0.5

JSON: ``{"name": "fast-cpu", "optimizations": [{"name": "cfg_cutoff", "fraction": 0.5}]}``
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from diffspeed.core.optimization import OptConfig, all_optimizations
from diffspeed.errors import DiffspeedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


MAX_FILE_BYTES = 1_000_000  # a real recipe is well under 10 KB; this bounds parse time and memory
MAX_OPTIMIZATIONS = 64  # each optimization may appear once, so a valid recipe lists at most ~20


class RecipeError(DiffspeedError):
    """Every problem of a recipe at once (``.problems``), joined into one line for the message."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{source} has {n} problem{'s' if n != 1 else ''}: {'; '.join(self.problems)}",
                         field="recipe")


@dataclass(frozen=True)
class Recipe:
    optimizations: tuple[OptConfig, ...] = ()
    name: str = ""
    description: str = ""

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def of(cls, *configs: OptConfig, name: str = "", description: str = "") -> Recipe:
        return cls(tuple(configs), name, description)

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        """Parse and validate, collecting every unknown name or field and every bad value."""
        if not isinstance(data, dict):
            raise RecipeError([f"expected a table/object at the top, got {type(data).__name__}"], source)
        items = data.get("optimizations", data.get("optimization", []))
        problems, configs = [], []
        if not isinstance(items, list):
            raise RecipeError(["'optimization' must be a list of tables"], source)
        if len(items) > MAX_OPTIMIZATIONS:
            raise RecipeError([f"{len(items)} optimizations listed; at most {MAX_OPTIMIZATIONS} (each may appear "
                               f"once)"], source)
        known = all_optimizations()
        for i, item in enumerate(items):
            where = f"optimization #{i + 1}"
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                problems.append(f"{where} needs a 'name' (one of {', '.join(sorted(known))})")
                continue
            fields = dict(item)
            name = fields.pop("name")
            if name not in known:
                problems.append(f"{where}: unknown optimization {name!r}; known: {', '.join(sorted(known))}")
                continue
            config_cls = known[name].Config
            valid = {f.name for f in dataclasses.fields(config_cls)}
            unknown = sorted(set(fields) - valid)
            problems += [f"{name}: unknown field {k!r}; fields: {', '.join(sorted(valid)) or '(none)'}"
                         for k in unknown]
            fields = {k: v for k, v in fields.items() if k in valid}
            found = _config_problems(config_cls, fields)
            if found:
                problems += found
            else:
                configs.append(config_cls(**fields))
        recipe = cls(tuple(configs), str(data.get("name", "")), str(data.get("description", "")))
        problems += recipe.check() if not problems else []
        if problems:
            raise RecipeError(problems, source)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a .toml or .json recipe file (at most ``MAX_FILE_BYTES``); every problem is one line."""
        path = Path(path)
        return cls.from_dict(_parse(path, _read_text(path)), source=str(path))

    # ------------------------------------------------------------------------------------------ save
    def to_dict(self) -> dict:
        out = {"name": self.name} if self.name else {}
        if self.description:
            out["description"] = self.description
        out["optimization"] = [{k: v for k, v in c.to_dict().items() if v is not None}
                               for c in self.optimizations]
        return out

    def save(self, path: str | Path) -> Path:
        import tomli_w

        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() == ".json":
            data["optimizations"] = data.pop("optimization")
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:  # block tables ([[optimization]]), which people edit more easily than tomli_w's inline ones
            items = data.pop("optimization")
            path.write_text(tomli_w.dumps(data) + "".join(f"\n[[optimization]]\n{tomli_w.dumps(i)}" for i in items))
        return path

    # ----------------------------------------------------------------------------------------- check
    def check(self, pipe=None, workflow: str | None = None) -> list[str]:
        """Conflicts, duplicates, order rules and unmet requirements (on ``pipe`` and for ``workflow`` --
        a key of :data:`~diffspeed.core.optimization.WORKFLOWS` -- when given)."""
        known = all_optimizations()
        names = [c.name for c in self.optimizations]
        counts = Counter(names)
        problems = [f"{n} appears {k} times; give it once" for n, k in sorted(counts.items()) if k > 1]
        problems += _conflicts(names, known)
        last = [n for n in counts if known[n].last and names[-1] != n]
        problems += [f"{n} must be the last optimization (it freezes what the others changed)" for n in last]
        by_name = {c.name: c for c in self.optimizations}
        for c in self.optimizations:
            others = {n: o for n, o in by_name.items() if n != c.name}
            problems += [f"{c.name} conflicts with {p}" for p in known[c.name].clashes(c, others)]
            problems += [f"{c.name}: {p}" for p in known[c.name].requirements(c, pipe)]
            if workflow is not None and workflow in known[c.name].unsupported:
                problems.append(f"{c.name} does not work with {workflow}: {known[c.name].unsupported[workflow]}")
        return problems

    def validate(self, pipe=None, source: str = "recipe", workflow: str | None = None) -> Recipe:
        problems = self.check(pipe, workflow)
        if problems:
            raise RecipeError(problems, source)
        return self


def _conflicts(names: list[str], known: dict) -> list[str]:
    """``a conflicts with b`` for each conflicting pair, ``a`` being the one listed first. Linear in the recipe's
    length: each name's few declared conflicts are looked up, instead of scanning every pair of entries (that
    scan took 11 s on a 480 KB, 13,000-entry recipe)."""
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        first.setdefault(n, i)
    pairs = {tuple(sorted((a, b), key=first.get)) for a in first for b in known[a].conflicts if b in first}
    return [f"{a} conflicts with {b}: {known[a].conflicts.get(b) or known[b].conflicts.get(a)}"
            for a, b in sorted(pairs, key=lambda ab: (first[ab[0]], first[ab[1]]))]


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise DiffspeedError(f"recipe: cannot read {path}: {err.strerror}", field="recipe") from err
    if len(raw) > MAX_FILE_BYTES:
        raise DiffspeedError(f"recipe: {path} is larger than {MAX_FILE_BYTES // 1_000_000} MB; a recipe is a short "
                             f"list of optimizations", field="recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DiffspeedError(f"recipe: {path} is not UTF-8 text (invalid byte 0x{raw[err.start]:02x} at byte offset "
                             f"{err.start})", field="recipe") from err


def _parse(path: Path, text: str):
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        return json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise DiffspeedError(f"recipe: {path} is not valid {kind}: {err}", field="recipe") from err
    except RecursionError as err:  # both parsers recurse once per bracket: [[[[... exhausts the stack
        raise DiffspeedError(f"recipe: {path} nests brackets too deeply to be a recipe", field="recipe") from err


def describe_tables(items: list[dict]) -> str:
    """Recipe tables as one line, ``name(key=value, ...) + ...`` -- how reports and listings show a recipe."""
    return " + ".join(i["name"] + "(" + ", ".join(f"{k}={v}" for k, v in i.items() if k != "name") + ")"
                      for i in items)


def _config_problems(config_cls: type[OptConfig], fields: dict) -> list[str]:
    """All field problems of ``config_cls(**fields)`` without stopping at the first."""
    try:
        config_cls(**fields)
    except DiffspeedError:
        pass
    else:
        return []
    probe = object.__new__(config_cls)
    for f in dataclasses.fields(config_cls):
        object.__setattr__(probe, f.name, fields.get(f.name, f.default))
    return [msg for _, msg in probe.problems()]
