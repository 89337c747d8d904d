"""Each peer runs as published on tiny-sd and its disable call gives the baseline images back.

Peers are other projects' code: their disable calls leave attributes behind (DeepCache's helper an instance
``forward``, diffusers' ``disable_freeu`` ``b1 = None`` ...), which is why the bench runs each entry in its own
process. Here each test loads its own pipeline so the residue cannot reach the shared fixtures."""

import numpy as np
import pytest
import torch

from diffspeed.bench.peers import build_peer, default_peers

PROMPT = "a red circle at center on a blue background"


def _run(pipe):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(2)).images[0]


@pytest.mark.parametrize("peer", [p for p in default_peers() if not p.cuda_only], ids=lambda p: p.name)
def test_cpu_peers_run_and_undo(peer):
    import diffspeed

    tiny_sd = diffspeed.load("tiny-sd", device="cpu")
    tiny_sd.set_progress_bar_config(disable=True)
    if peer.missing("cpu"):
        pytest.skip(peer.missing("cpu"))
    base = _run(tiny_sd)
    disable = build_peer(peer.key, peer.settings).enable(tiny_sd)
    try:
        image = _run(tiny_sd)
    finally:
        disable()
    assert np.isfinite(image).all() and image.shape == base.shape
    assert np.array_equal(_run(tiny_sd), base)


def test_cuda_only_peers_say_so_on_a_cpu():
    cuda = [p for p in default_peers() if p.cuda_only]
    assert {p.key for p in cuda} == {"diffusers_switch", "diffusers_compile"}
    assert all("needs a CUDA device" in p.missing("cpu") for p in cuda)
