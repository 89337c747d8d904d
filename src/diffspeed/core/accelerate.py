"""``diffspeed.accelerate(pipe, recipe)``: apply a validated recipe and call the pipeline through it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from diffspeed.core.edits import Edits
from diffspeed.core.optimization import OptConfig, Optimization, get_optimization
from diffspeed.core.recipe import Recipe, RecipeError
from diffspeed.core.state import RunState
from diffspeed.errors import DiffspeedError


class Accelerated:
    """A pipeline with a recipe applied. Call it exactly like the pipeline; attributes pass through.

    Before every call the per-call state and every stateful optimization are reset, so nothing leaks from
    one generation to the next. ``stats`` holds the last call's counts (denoiser calls, unconditional
    evaluations, skipped blocks, ...). As a context manager it removes everything on exit.
    """

    def __init__(self, pipe, recipe: Recipe | list[OptConfig] | tuple[OptConfig, ...], *, strict: bool = True):
        recipe = recipe if isinstance(recipe, Recipe) else Recipe(tuple(recipe))
        self.strict = strict
        recipe.validate(pipe)
        self.pipe = pipe
        self.recipe = recipe
        self.state = RunState()
        self.stats: dict[str, int] = {}
        self.events: list[str] = []
        self._own = Edits("accelerate")
        self._own.forward_pre_hook(pipe.unet, lambda *_: self.state.begin_denoiser_call(self.state.pipeline or pipe))
        self._own.forward_hook(pipe.unet, lambda *_: self.state.end_denoiser_call())
        self.optimizations: list[Optimization] = []
        self._chain: Counter = Counter()  # stats of this call and the passes it continues
        try:
            for config in recipe.optimizations:
                opt = get_optimization(config.name)(config)
                opt.apply(pipe, self.state)
                self.optimizations.append(opt)
        except BaseException:
            self.remove()
            raise
        # the effect check: an optimization that applied and changed nothing on this pipeline is a silent no-op,
        # unless it says why (e.g. attention: the pipeline already runs that backend)
        self.effects = {o.name: o.effect() for o in self.optimizations}
        self.setup_no_effect = [(f"{o.name}: no effect: applying it changed nothing on this pipeline"
                                 + (f" (it stood aside: {o.stood_aside})" if o.stood_aside else ""),
                                 bool(o.stood_aside))
                                for o in self.optimizations if not self.effects[o.name]]
        silent = [why for why, deliberate in self.setup_no_effect if not deliberate]
        if silent and strict:
            self.remove()
            raise DiffspeedError("; ".join(silent) + " (accelerate(..., strict=False) runs it anyway and notes it)",
                                 field=silent[0].split(":")[0])

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.optimizations]

    def __call__(self, *args: Any, **kwargs: Any):
        return self.run(self.pipe, *args, **kwargs)

    def run(self, target, *args: Any, continues: bool = False, check_effect: bool = True, **kwargs: Any):
        """Call ``target`` -- this pipeline or a workflow pipeline sharing its components (img2img, inpaint,
        see :func:`diffspeed.pipelines.workflows.workflow_pipeline`) -- with the recipe in effect.
        ``continues``: this call carries on from the previous one (hires fix's second pass); optimizations see
        it as ``state.continues`` while they reset, and may keep what the previous pass left them.
        ``check_effect=False``: a pass that another (``continues``) will follow; the effect check judges the
        passes together after the last."""
        if target is not self.pipe and getattr(target, "unet", None) is not self.pipe.unet:
            raise ValueError("Accelerated.run: the target pipeline must share this pipeline's UNet")
        self.state.reset()
        self.state.pipeline = target
        self.state.continues = continues
        for opt in self.optimizations:
            opt.reset()
        call = target.__call__
        for opt in self.optimizations:  # the first applied ends up innermost
            call = opt.wrap_call(call)
        try:
            out = call(*args, **kwargs)
        except BaseException:  # errors and Ctrl-C too: nothing that lives for one call outlives it, and the
            self._end_call(raise_errors=False)  # caller gets the call's own exception, not a cleanup's
            raise
        self._end_call(raise_errors=True)
        self._chain = (self._chain if continues else Counter()) + Counter(self.stats)
        if check_effect:
            self._check_effect()
        return out

    def _check_effect(self) -> None:
        """Note (``stats["no_effect:NAME"]`` and an event) each optimization that did nothing for this call
        (with the passes before it that it continues); strict, raise for those that did so silently -- not for
        one that stands aside on such calls by design or said why."""
        found = list(self.setup_no_effect)
        found += [hit for o in self.optimizations if (hit := o.call_no_effect(self._chain)) is not None]
        silent = [why for why, deliberate in found if not deliberate]
        if silent and self.strict:
            raise DiffspeedError("; ".join(silent) + " (accelerate(..., strict=False) notes it instead)",
                                 field=silent[0].split(":")[0])
        for why, _ in found:
            self.stats[f"no_effect:{why.split(':')[0]}"] = 1
            self.events.append(why)

    def _end_call(self, raise_errors: bool) -> None:
        errors = []
        for opt in reversed(self.optimizations):
            try:
                opt.end_call()
            except Exception as err:  # keep ending the others
                errors.append(err)
        self._own.end_call()
        self.stats = dict(self.state.stats)
        self.events = list(self.state.events)
        if errors and raise_errors:
            raise errors[0]

    def check_workflows(self, workflows: list[str]) -> list[str]:
        """Raise :class:`RecipeError` if an applied optimization cannot run one of ``workflows``; return notes
        on those that run but change nothing there (see ``Optimization.unsupported`` / ``no_effect``)."""
        problems = [f"{o.name} does not work with {wf}: {o.unsupported[wf]}"
                    for wf in workflows for o in self.optimizations if wf in o.unsupported]
        if problems:
            raise RecipeError(problems, "recipe")
        return [f"{o.name}: no effect on {wf} ({o.no_effect[wf]})"
                for wf in workflows for o in self.optimizations if wf in o.no_effect]

    def remove(self) -> None:
        """Undo every optimization in reverse order; the pipeline is then exactly as it was."""
        while self.optimizations:
            self.optimizations.pop().remove()
        self._own.undo()

    def __enter__(self) -> Accelerated:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getattr__(self, name: str):
        return getattr(self.__dict__["pipe"], name)


def accelerate(pipe, recipe, *, strict: bool = True) -> Accelerated:
    """Apply ``recipe`` (a :class:`Recipe`, a list of configs, or a path to a TOML/JSON file) to ``pipe``.

    ``strict``: an optimization that applies but changes nothing on this pipeline, or does nothing for a call
    (its ``call_effect`` stats stay 0: a cache never hit, no token merged), raises; with ``strict=False`` it is
    noted in the call's ``stats`` (``no_effect:NAME``) and ``events`` instead."""
    from pathlib import Path

    if isinstance(recipe, (str, Path)):
        recipe = Recipe.load(recipe)
    return Accelerated(pipe, recipe, strict=strict)
