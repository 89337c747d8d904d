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
from dataclasses import dataclass
from pathlib import Path

from diffspeed.core.optimization import OptConfig, all_optimizations
from diffspeed.errors import DiffspeedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
        known = all_optimizations()
        for i, item in enumerate(items):
            where = f"optimization #{i + 1}"
            if not isinstance(item, dict) or "name" not in item:
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
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise DiffspeedError(f"recipe: cannot read {path}: {err.strerror}", field="recipe") from err
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise DiffspeedError(f"recipe: {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: "
                                 f"{err}", field="recipe") from err
        return cls.from_dict(data, source=str(path))

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
        problems = [f"{n} appears {names.count(n)} times; give it once" for n in sorted(set(names))
                    if names.count(n) > 1]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                reason = known[a].conflicts.get(b) or known[b].conflicts.get(a)
                if reason:
                    problems.append(f"{a} conflicts with {b}: {reason}")
        for i, n in enumerate(names):
            if known[n].last and i != len(names) - 1:
                problems.append(f"{n} must be the last optimization (it freezes what the others changed)")
        for c in self.optimizations:
            problems += [f"{c.name}: {p}" for p in known[c.name].requirements(c, pipe)]
            if workflow is not None and workflow in known[c.name].unsupported:
                problems.append(f"{c.name} does not work with {workflow}: {known[c.name].unsupported[workflow]}")
        return problems

    def validate(self, pipe=None, source: str = "recipe", workflow: str | None = None) -> Recipe:
        problems = self.check(pipe, workflow)
        if problems:
            raise RecipeError(problems, source)
        return self


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
