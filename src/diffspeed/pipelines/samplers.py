"""Web-UI sampler names mapped to diffusers schedulers.

The mapping follows the diffusers scheduler overview's "A1111/k-diffusion" table: each web-UI name is a
scheduler class plus the config overrides that make it behave like the web UI's sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError

diffusers = lazy_import("diffusers")  # the names below are data for the CLI's help; schedulers are built later


@dataclass(frozen=True)
class Sampler:
    name: str
    cls: str  # diffusers scheduler class name
    overrides: dict = field(default_factory=dict)
    needs: str | None = None  # optional import this sampler requires
    eta: float | None = None  # the call's ``eta`` this sampler reads (DDIM's noise, TCD's gamma) and its default;
    #                           None: the sampler has no eta

    def build(self, base_config):
        """A new scheduler of this kind that keeps ``base_config``'s training schedule (betas, timesteps)."""
        if self.needs:
            try:
                __import__(self.needs)
            except ImportError as err:
                raise DiffspeedError(f"sampler {self.name!r} needs the {self.needs!r} package: "
                                     f"pip install {self.needs}", field="sampler") from err
        return getattr(diffusers, self.cls).from_config(base_config, **self.overrides)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    # the web UI's DDIM clips nothing; a config without the key would default to clipping x0 to [-1, 1] in latents
    Sampler("DDIM", "DDIMScheduler", {"clip_sample": False}, eta=0.0),
    Sampler("PNDM", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("LMS", "LMSDiscreteScheduler", needs="scipy"),
    Sampler("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, needs="scipy"),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, needs="torchsde"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    # few-step samplers for step-distilled models (diffspeed.optim.accelerator): LCM-LoRA's consistency sampler,
    # TCD's strategic stochastic sampler (its gamma is the call's ``eta``, 0.3 by default), and the "trailing"
    # timestep spacing that SDXL-Lightning (Euler), Hyper-SD and PCM (DDIM) were distilled for -- the web UI's
    # "SGM Uniform" schedule type: the last timestep is 999, so the first step starts from pure noise
    Sampler("LCM", "LCMScheduler"),
    Sampler("TCD", "TCDScheduler", eta=0.3),
    Sampler("Euler Trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    Sampler("DDIM Trailing", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, eta=0.0),
)}


def check_eta(sampler: str, eta: float | None) -> None:
    """A one-line error naming ``eta`` when it is given for a sampler that reads none."""
    if eta is not None and get_sampler(sampler).eta is None:
        raise DiffspeedError(f"eta: the {get_sampler(sampler).name} sampler reads no eta (DDIM, DDIM Trailing and "
                             "TCD do); leave it out", field="eta")


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by its web-UI name, ignoring case and surrounding spaces."""
    key = {k.lower(): k for k in SAMPLERS}.get(str(name).strip().lower())
    if key is None:
        raise DiffspeedError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}", field="sampler")
    return SAMPLERS[key]
