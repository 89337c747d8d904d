"""Each peer runs as published on tiny-sd and its disable call gives the baseline images back.

Peers are other projects' code: their disable calls leave attributes behind (DeepCache's helper an instance
``forward``, diffusers' ``disable_freeu`` ``b1 = None`` ...), which is why the bench runs each entry in its own
process. Here each test loads its own pipeline so the residue cannot reach the shared fixtures."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffspeed.bench import peers, runner
from diffspeed.bench.peers import (
    PEER_PYTHON_ENV,
    Peer,
    activate,
    build_peer,
    default_peers,
    diffusers_documented,
    diffusers_pab,
    openvino_pipeline,
)
from diffspeed.bench.runner import Entry, where_to_run

PROMPT = "a red circle at center on a blue background"
PEER_VENV = Path(os.environ.get("DIFFSPEED_PEER_VENV", "~/.cache/diffspeed/peer-venv")).expanduser()


def _run(pipe):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(2)).images[0]


def _own_tiny_sd():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("peer", [p for p in default_peers() if not p.cuda_only and not p.static_call],
                         ids=lambda p: p.name)
def test_cpu_peers_run_and_undo(peer):
    tiny_sd = _own_tiny_sd()
    if peer.missing("cpu"):
        pytest.skip(peer.missing("cpu"))
    base = _run(tiny_sd)
    enabled = activate(build_peer(peer.key, peer.settings), tiny_sd)
    try:
        image = _run(enabled.call or tiny_sd)
    finally:
        enabled.disable()
    assert np.isfinite(image).all() and image.shape == base.shape
    assert np.array_equal(_run(tiny_sd), base)


def test_cuda_only_peers_say_so_on_a_cpu():
    cuda = [p for p in default_peers() if p.cuda_only]
    assert {p.key for p in cuda} == {"diffusers_switch", "diffusers_compile"}
    assert all("needs a CUDA device" in p.missing("cpu") for p in cuda)


def test_every_default_peer_rebuilds_from_its_key():
    for peer in default_peers():
        again = build_peer(peer.key, json.loads(json.dumps(peer.settings)))  # as a worker gets it, through JSON
        assert again.name == peer.name


def _unet_state(unet):
    """What a hook could leave behind: registries and instance ``forward`` attributes, and the weights."""
    residue = [n for n, m in unet.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in vars(m)]
    return residue, {k: v.clone() for k, v in unet.state_dict().items()}


def test_pab_hooks_the_self_attentions_changes_the_output_and_removes_every_trace():
    pipe = _own_tiny_sd()
    base = _run(pipe)
    residue, weights = _unet_state(pipe.unet)
    enabled = activate(diffusers_pab(), pipe)
    try:
        hooked = [n for n, m in pipe.unet.named_modules() if "pyramid_attention_broadcast" in
                  getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]
        assert hooked and all(n.endswith("attn1") for n in hooked)  # self-attention only: attn2 is cross
        assert f"{len(hooked)} self-attention modules hooked" in enabled.events[0]
        # of 3 steps, those inside timesteps (100, 800) reuse the attention of the step before every other call
        first, second = _run(enabled.call), _run(enabled.call)
    finally:
        enabled.disable()
    assert not np.array_equal(first, base) and np.isfinite(first).all()
    assert np.array_equal(first, second)  # the hooks' state is reset per generation
    after_residue, after = _unet_state(pipe.unet)
    assert after_residue == residue == []
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert np.array_equal(_run(pipe), base)


def test_pab_that_reaches_nothing_is_not_timed():
    class NoAttention(torch.nn.Module):
        def forward(self, x, t):
            return x

    pipe = type("Pipe", (), {"unet": NoAttention(), "__call__": lambda self, *a, **k: None})()
    with pytest.raises(peers.NotApplicable, match="hooked no attention module"):
        activate(diffusers_pab(), pipe)
    assert not hasattr(pipe.unet, "_diffusers_hook") and not pipe.unet._forward_pre_hooks


def test_documented_settings_follow_the_cpu_and_restore_the_pipeline_bit_for_bit(monkeypatch):
    from diffspeed import hardware

    pipe = _own_tiny_sd()
    base = _run(pipe)
    weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
               for c in ("unet", "vae", "text_encoder")}
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hardware, "native_bf16", lambda profile, native=native: native)
        enabled = activate(diffusers_documented(), pipe)
        try:
            assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == dtype
            assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            assert ("bf16" if native else "fp32") in enabled.events[0] and "AttnProcessor2_0" in enabled.events[0]
            image = _run(pipe)
        finally:
            enabled.disable()
        assert np.isfinite(image).all() and (native or np.abs(image - base).max() < 1e-3)  # fp32: layout only
    for c, state in weights.items():
        now = getattr(pipe, c).state_dict()
        assert all(torch.equal(now[k], v) and now[k].stride() == v.stride() for k, v in state.items()), c
    assert pipe.unet.dtype == torch.float32 and np.array_equal(_run(pipe), base)


# --------------------------------------------------------------------------- where a peer runs
def test_openvino_peer_without_its_package_or_a_peer_interpreter_is_skipped_saying_how(monkeypatch):
    monkeypatch.delenv(PEER_PYTHON_ENV, raising=False)
    # diffspeed's environment: optimum-intel installed but failing to import (transformers too new) ...
    monkeypatch.setattr(Peer, "_not_installed", lambda self: None)
    monkeypatch.setattr(peers, "interpreter_problem", lambda python, check, env=(): (
        f"{check!r} fails under {python}: ImportError: cannot import name 'VisionRotaryEmbedding'"))
    python, why = where_to_run(Entry.of_peer(openvino_pipeline()), "cpu")
    assert python is None and "VisionRotaryEmbedding" in why
    assert "tools/peer_venv.sh" in why and PEER_PYTHON_ENV in why
    # ... or not installed at all
    monkeypatch.undo()
    monkeypatch.delenv(PEER_PYTHON_ENV, raising=False)
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name.startswith("optimum")
                        else real(name))
    for why in (openvino_pipeline().missing("cpu"), where_to_run(Entry.of_peer(openvino_pipeline()), "cpu")[1]):
        assert "'optimum.intel' is not installed" in why and "tools/peer_venv.sh" in why
    assert "CPU only" in openvino_pipeline().missing("cuda")


def test_a_failing_import_in_an_interpreter_is_named():
    why = peers.interpreter_problem(sys.executable, "import diffspeed_no_such_package_here")
    assert "ModuleNotFoundError" in why and "diffspeed_no_such_package_here" in why
    assert peers.interpreter_problem(str(Path(sys.executable).parent / "no-such-python"), "pass").startswith(
        "cannot run")


def _fake_peer():
    """A peer whose check passes only in a process started by the wrapper below."""
    return Peer("fake peer for the interpreter switch", "diffspeed", lambda pipe: (lambda: None), {},
                "fake_peer", check="import os; assert os.environ.get('DIFFSPEED_FAKE_PEER_HERE') == '1'")


def test_a_peer_that_imports_only_in_the_peer_interpreter_is_spawned_with_it(tmp_path, monkeypatch):
    wrapper = tmp_path / "peer-python"  # a second interpreter: this one, under another name and environment
    wrapper.write_text(f"#!/bin/sh\nDIFFSPEED_FAKE_PEER_HERE=1 exec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setitem(peers.PEERS, "fake_peer", _fake_peer)
    monkeypatch.setenv(PEER_PYTHON_ENV, str(wrapper))
    spawned = []

    real_popen = subprocess.Popen

    class FakeWorker:  # what started a worker: the interpreter, and a result file as a worker writes it
        def __init__(self, argv, stdout, stderr, text, env):
            spawned.append(argv[0])
            job = json.loads(Path(argv[3]).read_text())
            Path(argv[4]).write_text(json.dumps(runner.new_result(job["entry"]["name"], "skipped", "faked")))
            self.stdout = iter(())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 0

    def popen(argv, *args, **kwargs):  # the import probes run for real
        worker = "diffspeed.bench.worker" in argv
        return FakeWorker(argv, *args, **kwargs) if worker else real_popen(argv, *args, **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    data = runner.bench("tiny-sd", entries=[Entry.of_peer(_fake_peer())], steps=1, runs=1, warmup=0, prompts=1,
                        out=tmp_path / "out", progress=False, noise_check=False)
    assert spawned == [sys.executable, str(wrapper)]  # the baseline here, the peer in the peer interpreter
    assert data["settings"]["peer_python"] == str(wrapper)
    monkeypatch.delenv(PEER_PYTHON_ENV)
    python, why = where_to_run(Entry.of_peer(_fake_peer()), "cpu")
    assert python is None and "AssertionError" in why


# --------------------------------------------------------------------------- the OpenVINO peer, for real
def _peer_python() -> str | None:
    python = os.environ.get(PEER_PYTHON_ENV) or str(PEER_VENV / "bin" / "python")
    return python if Path(python).is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_peer_python() is None, reason="no peer environment: run tools/peer_venv.sh first")
def test_openvino_peer_runs_in_the_peer_environment_close_to_the_baseline(tmp_path):
    # its own process, as a user runs it: the export takes a minute of tiny-sd on 2 cores
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "diffspeed.cli", "bench", "--model", "tiny-sd", "--steps", "4",
                           "--prompts", "1", "--runs", "1", "--warmup", "0", "--only", "openvino", "--out", str(out),
                           "--quiet"], env=dict(os.environ, **{PEER_PYTHON_ENV: _peer_python()}),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["entries"]}
    row = rows[openvino_pipeline().name]
    assert row["status"] == "ok", row["error"]
    assert row["interpreter"]["python"] == _peer_python()
    assert row["interpreter"]["versions"]["optimum-intel"] and row["interpreter"]["versions"]["openvino"]
    assert any("INFERENCE_PRECISION_HINT" in e and "unet" in e for e in row["events"])  # the hint used
    assert float(row["fidelity"]["psnr_db"]) > 30 and row["fidelity"]["ssim"] > 0.95  # bf16 or f32: same image
