"""``diffspeed convert``: web-UI pickles and safetensors -> verified original-layout safetensors.

The shipped tiny-sd model is exported with the project's own exporter, wrapped the way the CompVis /
Lightning trainers save checkpoints (``state_dict`` plus optimizer state, EMA copies and bookkeeping), and
converted; the result must load through ``diffspeed.load`` and draw the same image as the original model.
"""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffspeed
from diffspeed.cli import main
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.pipelines import single_file
from diffspeed.pipelines.convert import _keep_global_step, _nbytes, _split, convert_checkpoint
from diffspeed.pipelines.load import shipped_path
from diffspeed.pipelines.single_file import export_single_file

CONFIG = shipped_path("tiny-sd")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
LOSS_KEY = "first_stage_model.loss.logvar"


@pytest.fixture(scope="module")
def exported(tiny_sd, tmp_path_factory):
    """tiny-sd as one original-layout .safetensors file, and its tensors."""
    path = export_single_file(tiny_sd, tmp_path_factory.mktemp("exported") / "tiny-sd.safetensors")
    return path, load_file(str(path))


def _ema(state: dict) -> dict:
    """LDM's LitEma names: ``model_ema.`` + the parameter name without dots; nudged so a swap shows."""
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1e-3
           for k, v in state.items() if k.startswith(UNET)}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return ema


@pytest.fixture(scope="module")
def webui_ckpt(exported, tmp_path_factory):
    """A Lightning-style training checkpoint of tiny-sd, written with torch.save."""
    _, state = exported
    path = tmp_path_factory.mktemp("webui") / "tiny-sd-trained.ckpt"
    torch.save({
        "state_dict": {**state, **_ema(state), LOSS_KEY: torch.zeros(())},
        "global_step": 10, "epoch": 2, "pytorch-lightning_version": "1.9.0",
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 2}], "callbacks": {"ModelCheckpoint": {"best_model_score": None}},
        "native_amp_scaling_state": {"scale": torch.tensor(65536.0)},
    }, path)
    return path


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle at top left", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(1)).images


@pytest.fixture(scope="module")
def baseline(tiny_sd):
    return _image(tiny_sd)


def _keys(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


# ------------------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize(("prune", "fp16"), [(False, False), (True, False), (False, True), (True, True)])
def test_converted_pickle_draws_the_same_image(prune, fp16, webui_ckpt, exported, baseline, tmp_path):
    out = tmp_path / "out.safetensors"
    report = convert_checkpoint(webui_ckpt, out, prune=prune, fp16=fp16, config_dir=CONFIG)

    assert report.verified and report.family == "sd15" and report.output == out
    assert report.input_bytes == webui_ckpt.stat().st_size and report.output_bytes == out.stat().st_size
    keys = _keys(out)
    assert report.tensors_kept == len(keys)
    assert set(exported[1]) <= set(keys)  # every model weight is kept
    training = {"optimizer_states", "epoch", "lr_schedulers", "callbacks", "native_amp_scaling_state",
                "pytorch-lightning_version"}
    assert training <= set(report.dropped_keys)  # safetensors stores tensors only, pruned or not
    has_ema = any(k.startswith("model_ema.") for k in keys)
    assert has_ema is not prune and (LOSS_KEY in keys) is not prune and ("global_step" in keys) is not prune
    if prune:
        ema_count = len(_ema(exported[1]))
        assert report.dropped["EMA"][0] == ema_count and report.dropped["EMA"][1] > 1e6
        assert report.output_bytes < report.input_bytes - report.dropped["EMA"][1]
    if fp16:
        floats = {dtype for key, dtype in keys.items() if key != "global_step" and dtype.startswith(("F", "BF"))}
        assert floats == {"F16"} and report.cast_to_fp16 == sum(d == "F16" for d in keys.values())
    else:
        assert report.cast_to_fp16 == 0

    image = _image(diffspeed.load(out, device="cpu", config_dir=CONFIG))
    if fp16:
        assert np.abs(image - baseline).mean() < 0.01  # fp16 weights, fp32 compute
    else:
        np.testing.assert_array_equal(image, baseline)


def test_safetensors_input_to_fp16(exported, tmp_path):
    path, state = exported
    out = tmp_path / "half.safetensors"
    report = convert_checkpoint(path, out, fp16=True, config_dir=CONFIG)
    assert report.verified and report.dropped == {} and report.tensors_kept == len(state)
    assert set(_keys(out).values()) == {"F16"}
    assert out.stat().st_size < path.stat().st_size * 0.6


def test_fp16_leaves_integers_and_position_ids_alone(exported, tmp_path):
    _, state = exported
    src = tmp_path / "m.safetensors"
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    save_file({**state, position_ids: torch.arange(77).float()[None], "alphas_cumprod": torch.rand(10),
               "model_ema.num_updates": torch.tensor(3, dtype=torch.int32)}, str(src))
    convert_checkpoint(src, tmp_path / "out.safetensors", fp16=True, config_dir=CONFIG)
    keys = _keys(tmp_path / "out.safetensors")
    assert keys[position_ids] == "F32" and keys["alphas_cumprod"] == "F32" and keys["model_ema.num_updates"] == "I32"


def test_fp16_refuses_values_it_cannot_hold(exported, tmp_path):
    _, state = exported
    src = tmp_path / "m.safetensors"
    save_file({**state, UNET + "out.2.bias": torch.full((4,), 1e6)}, str(src))
    with pytest.raises(DiffspeedError, match="float16's range") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors", fp16=True, config_dir=CONFIG)
    assert err.value.field == "fp16" and not (tmp_path / "out.safetensors").exists()


def test_use_ema_swaps_in_the_ema_unet(webui_ckpt, exported, tmp_path):
    out = tmp_path / "ema.safetensors"
    report = convert_checkpoint(webui_ckpt, out, use_ema=True, config_dir=CONFIG)
    written, state = load_file(str(out)), exported[1]
    unet = [k for k in state if k.startswith(UNET)]
    assert report.ema_tensors == len(unet)
    assert all(torch.equal(written[k], state[k] + 1e-3) for k in unet)
    assert not any(k.startswith("model_ema.") for k in written)


def test_sd2_base_keeps_its_global_step_when_pruned():
    """875000 is what tells SD 2 base (epsilon) from SD 2 (v-prediction); pruning must not lose it."""
    meta = torch.empty(1, device="meta")
    state = {UNET + "out.2.bias": meta, VAE + "decoder.conv_out.bias": meta, "cond_stage_model.model.x": meta}
    for step, kept in ((875000, True), (10, False)):
        pruned, dropped = dict(state), []
        family = "sd2-base" if kept else "sd2"
        _keep_global_step(pruned, {"global_step": step, "epoch": 1}, family, dropped, prune=True)
        assert ("global_step" in pruned) is kept and ("epoch", "training-state", 0) in dropped


# ---------------------------------------------------------------------------------------------- refusals


def test_refuses_to_overwrite_without_force(exported, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(DiffspeedError, match="already exists.*--force") as err:
        convert_checkpoint(exported[0], out, config_dir=CONFIG)
    assert err.value.field == "output" and out.read_bytes() == b"keep me"
    convert_checkpoint(exported[0], out, force=True, config_dir=CONFIG)
    assert set(_keys(out)) == set(exported[1])
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no partial file left


class _Payload:
    """Unpickling this runs ``call(*args)``: what a malicious checkpoint does."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _malicious(path, marker, how, writer):
    payload = _Payload(os.system, (f"touch '{marker}'",)) if how == "os.system" else _Payload(open, (str(marker), "w"))
    if writer == "torch.save":
        torch.save({"state_dict": {UNET + "out.2.bias": torch.zeros(4)}, "callbacks": payload}, path)
    else:  # no tensors, so that the unpickler meets the payload first
        obj = {"state_dict": {UNET + "out.2.bias": [0.0] * 4}, "callbacks": payload}
        path.write_bytes(pickle.dumps(obj, protocol=int(writer.removeprefix("pickle-protocol-"))))
    return path


@pytest.mark.skipif(os.name != "posix", reason="the os.system payload uses touch")
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-5"])
@pytest.mark.parametrize("how", ["os.system", "open"])
def test_malicious_pickle_is_refused_and_never_run(how, writer, tmp_path):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_Payload(open, (str(live), "w"))))  # the payload kind is live under pickle
    assert live.exists()
    marker = tmp_path / "pwned"
    src = _malicious(tmp_path / "evil.ckpt", marker, how, writer)
    called = "posix.system" if how == "os.system" else "io.open"  # where pickle finds each function
    with pytest.raises(DiffspeedError, match=rf"would call {called}, so it was refused \(nothing in it was run") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert err.value.field == "checkpoint" and "\n" not in str(err.value)
    assert "weights_only" not in str(err.value) and "()" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("name", "content", "match"), [
    ("missing.ckpt", None, "no such file"),
    ("model.txt", b"hello", "must end in one of"),
    ("junk.ckpt", b"not a pickle at all", "not a plain weights file"),
    ("junk.safetensors", b"\x00" * 64, "not a readable checkpoint"),
    ("list.pt", "list", "holds a list"),
    ("unet-only.safetensors", "unet", "no VAE weights"),
])
def test_bad_input_is_a_clear_error(name, content, match, tmp_path):
    src = tmp_path / name
    if content == "list":
        torch.save([torch.zeros(1)], src)
    elif content == "unet":
        save_file({UNET + "out.2.bias": torch.zeros(4)}, str(src))
    elif content is not None:
        src.write_bytes(content)
    with pytest.raises(DiffspeedError, match=match) as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert err.value.field == "checkpoint" and "\n" not in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_input(exported, tmp_path):
    src = tmp_path / "locked.safetensors"
    src.write_bytes(exported[0].read_bytes())
    src.chmod(0)
    with pytest.raises(DiffspeedError, match="not a readable file") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert err.value.field == "checkpoint"


def test_output_must_be_safetensors(exported, tmp_path):
    with pytest.raises(DiffspeedError, match=r"\.safetensors") as err:
        convert_checkpoint(exported[0], tmp_path / "out.ckpt")
    assert err.value.field == "output"


def test_failed_verification_leaves_no_file(exported, tmp_path):
    """Without config_dir the tiny model meets the full-size SD 1.5 configs and cannot load."""
    with pytest.raises(DiffspeedError, match="verification failed") as err:
        convert_checkpoint(exported[0], tmp_path / "out.safetensors")
    assert err.value.field == "config_dir"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ hostile files


def _self_referencing(path, *, cycle: int = 1, depth: int = 0):
    """A dict whose ``state_dict`` chain returns to itself after ``cycle`` steps (the unpickler's memo makes
    that a ~1.5 KB file), or, with ``depth``, a chain of that many honest wrappers."""
    levels = [{UNET + "out.2.bias": torch.zeros(4), "global_step": 1} for _ in range(max(cycle, depth))]
    for outer, inner in zip(levels, levels[1:]):
        outer["state_dict"] = inner
    if not depth:
        levels[-1]["state_dict"] = levels[0]
    torch.save(levels[0], path)
    return path


@pytest.mark.parametrize(("cycle", "depth", "match"), [
    (1, 0, "state_dict contains itself"), (3, 0, "state_dict contains itself"), (0, 9, "more than 8 times")])
def test_self_referencing_checkpoint_is_refused_at_once(cycle, depth, match, tmp_path):
    src = _self_referencing(tmp_path / "loop.ckpt", cycle=cycle, depth=depth)
    assert src.stat().st_size < 4000
    start = time.perf_counter()
    with pytest.raises(DiffspeedError, match=f"checkpoint: loop.ckpt is not a plain weights file: .*{match}") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert time.perf_counter() - start < 1.0
    assert err.value.field == "checkpoint" and "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["loop.ckpt"]


def test_self_referencing_vae_is_refused(exported, tmp_path):
    vae = _self_referencing(tmp_path / "vae.ckpt")
    with pytest.raises(DiffspeedError, match="vae: vae.ckpt .*contains itself") as err:
        convert_checkpoint(exported[0], tmp_path / "out.safetensors", vae=vae, config_dir=CONFIG)
    assert err.value.field == "vae"


def test_eight_honest_wrappers_are_still_read(tmp_path):
    """The bound is far above what trainers write (one or two levels), and the innermost weights win."""
    src = _self_referencing(tmp_path / "deep.ckpt", depth=8)
    with pytest.raises(DiffspeedError, match="no VAE weights"):  # read through all 8, then judged as weights
        convert_checkpoint(src, tmp_path / "out.safetensors")


def test_cyclic_and_shared_extras_are_measured_once(tmp_path):
    """Trainer extras are only measured and dropped, but the walk must survive what the memo can build."""
    tensor = torch.zeros(10)
    looped = [tensor]
    looped.append(looped)
    shared = [tensor]
    for _ in range(100):  # 2**100 paths to one tensor
        shared = [shared, shared]
    path = tmp_path / "extras.ckpt"
    torch.save({"looped": looped, "shared": shared, "mapping": {"a": looped, "b": (tensor, tensor)}}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["looped"][1] is loaded["looped"]  # torch keeps the cycle
    start = time.perf_counter()
    assert _nbytes(loaded) == 40 and _nbytes(loaded["shared"]) == 40
    assert time.perf_counter() - start < 1.0


def test_tensors_under_non_text_keys_are_extras():
    inner = {UNET + "x": torch.zeros(1), 3: torch.zeros(2)}
    weights, extras = _split([{"state_dict": inner, "epoch": 1}, inner])
    assert list(weights) == [UNET + "x"] and set(extras) == {3, "epoch"}


@pytest.mark.parametrize(("protocol", "called"), [(2, "eval"), (4, "builtins.eval"), (5, "builtins.eval")])
def test_refusal_names_what_would_be_called(protocol, called, tmp_path):
    """Protocol 4+ pickles are refused for their framing before torch reaches the global; the opcodes say."""
    marker = tmp_path / "ran"
    src = tmp_path / "evil.pt"
    payload = _Payload(builtins.eval, (f"open({str(marker)!r}, 'w')",))
    src.write_bytes(pickle.dumps({"state_dict": {UNET + "x": 1.0}, "hparams": payload}, protocol=protocol))
    with pytest.raises(DiffspeedError, match=rf"would call {called}, so it was refused") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert "weights_only" not in str(err.value) and "()" not in str(err.value) and not marker.exists()


def test_a_plain_text_file_is_not_a_pickle(tmp_path):
    src = tmp_path / "notes.ckpt"
    src.write_text("not a pickle at all")
    with pytest.raises(DiffspeedError, match=r"byte 0x6e is no pickle opcode: not a pickle") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert "weights_only" not in str(err.value)


def test_cli_refuses_a_self_referencing_checkpoint_in_one_line(tmp_path, capsys):
    src = _self_referencing(tmp_path / "loop.ckpt")
    rc = main(["convert", str(src), str(tmp_path / "out.safetensors")])  # (timed above, without CLI imports)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "contains itself" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ failed writes


def _read_only(monkeypatch, *, mkdir: bool = False):
    """A read-only file system as root sees it (chmod stops nothing): every write fails with EROFS, and so
    does unlink, even of a file that is not there -- the cleanup error that used to mask the real one."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def refuse_save(tensors, filename, metadata=None):  # what safetensors really raises
        raise Exception(f'Error while serializing: I/O error: Read-only file system (os error 30) at path '
                        f'"{filename}"')

    monkeypatch.setattr(single_file, "save_file", refuse_save)
    monkeypatch.setattr(Path, "unlink", refuse)
    if mkdir:
        monkeypatch.setattr(Path, "mkdir", refuse)


def test_read_only_output_folder_is_one_line_naming_the_cause(exported, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    _read_only(monkeypatch)
    with pytest.raises(DiffspeedRuntimeError) as err:
        convert_checkpoint(exported[0], out, config_dir=CONFIG)
    assert str(err.value) == f"output: cannot write {out}: Read-only file system"
    assert err.value.field == "output" and err.value.exit_code == 1
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_read_only_parent_of_new_folders(exported, tmp_path, monkeypatch):
    out = tmp_path / "new" / "deep" / "out.safetensors"
    _read_only(monkeypatch, mkdir=True)
    with pytest.raises(DiffspeedRuntimeError, match=f"^output: cannot write {out}: Read-only file system$"):
        convert_checkpoint(exported[0], out, config_dir=CONFIG)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, which refuses new files")
def test_really_unwritable_output_folder(exported):
    """A real kernel refusal (sysfs refuses new files even to root), for the path that is not simulated."""
    out = Path("/sys/kernel/diffspeed-test/out.safetensors")
    with pytest.raises(DiffspeedRuntimeError, match=f"^output: cannot write {out}: ") as err:
        convert_checkpoint(exported[0], out, config_dir=CONFIG)
    assert "\n" not in str(err.value) and not out.parent.exists()


def test_failed_convert_removes_only_the_folders_it_made(exported, tmp_path):
    """Verification fails (full-size configs for a tiny model): new/deep/ go, the folder that was there stays."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(DiffspeedError, match="verification failed"):
        convert_checkpoint(exported[0], tmp_path / "kept" / "new" / "deep" / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_convert_into_new_folders(exported, tmp_path):
    out = tmp_path / "new" / "deep" / "out.safetensors"
    convert_checkpoint(exported[0], out, config_dir=CONFIG)
    assert [p.name for p in out.parent.iterdir()] == ["out.safetensors"]


# ------------------------------------------------------------------------------------------- VAE baking


def _perturbed_vae(state: dict) -> dict:
    return {k.removeprefix(VAE): v * 0.5 + 0.01 for k, v in state.items() if k.startswith(VAE)}


@pytest.mark.parametrize("layout", ["bare.safetensors", "prefixed.safetensors", "wrapped.ckpt", "linear-attn.pt"])
def test_vae_is_baked_in(layout, exported, tiny_sd, tmp_path):
    _, state = exported
    vae = _perturbed_vae(state)
    src = tmp_path / f"vae-{layout}"
    if layout == "bare.safetensors":
        save_file(vae, str(src))
    elif layout == "prefixed.safetensors":
        save_file({VAE + k: v for k, v in vae.items()}, str(src))
    elif layout == "wrapped.ckpt":  # web-UI VAE files: bare keys in state_dict, loss weights beside them
        torch.save({"state_dict": {**vae, "loss.logvar": torch.zeros(())}, "global_step": 840000}, src)
    else:  # diffusers-style linear attention weights in the original names: reshaped back to 1x1 convs
        torch.save({k: v.squeeze() if ".attn_1." in k and v.ndim == 4 else v for k, v in vae.items()}, src)

    out = tmp_path / "baked.safetensors"
    report = convert_checkpoint(exported[0], out, vae=src, config_dir=CONFIG)
    assert report.vae_tensors == len(vae) and report.verified
    written = load_file(str(out))
    assert all(torch.equal(written[VAE + k], v) for k, v in vae.items())
    assert all(torch.equal(written[k], v) for k, v in state.items() if not k.startswith(VAE))
    loaded = diffspeed.load(out, device="cpu", config_dir=CONFIG)
    conv = loaded.vae.decoder.conv_out.weight
    assert torch.equal(conv, tiny_sd.vae.decoder.conv_out.weight * 0.5 + 0.01)


@pytest.mark.parametrize(("edit", "match"), [
    ("shape", "has shape"), ("missing", "1 missing"), ("empty", "no VAE weights"),
    ("diffusers", "diffusers layout"), ("nofile", "no such file"),
])
def test_vae_mismatch_is_refused(edit, match, exported, tmp_path):
    _, state = exported
    vae = _perturbed_vae(state)
    src = tmp_path / "vae.safetensors"
    if edit == "shape":
        vae["decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    elif edit == "missing":
        del vae["decoder.conv_out.bias"]
    elif edit == "empty":
        vae = {UNET + "out.2.bias": torch.zeros(4)}
    elif edit == "diffusers":
        vae["encoder.down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(1)
    if edit != "nofile":
        save_file(vae, str(src))
    out = tmp_path / "baked.safetensors"
    with pytest.raises(DiffspeedError, match=match) as err:
        convert_checkpoint(exported[0], out, vae=src, config_dir=CONFIG)
    assert err.value.field == "vae" and not out.exists()


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_converts_and_summarizes(webui_ckpt, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc = main(["convert", str(webui_ckpt), str(out), "--prune", "--fp16", "--config-dir", str(CONFIG)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "sd15" in printed and "cast to fp16" in printed and "dropped" in printed and "verified" in printed


@pytest.mark.parametrize(("case", "field"), [("exists", "output"), ("missing", "checkpoint"),
                                             ("malicious", "checkpoint"), ("vae", "vae")])
def test_cli_errors_are_one_line_exit_2(case, field, exported, tmp_path, capsys):
    src, out = exported[0], tmp_path / "out.safetensors"
    args = []
    if case == "exists":
        out.write_bytes(b"keep me")
    elif case == "missing":
        src = tmp_path / "nope.ckpt"
    elif case == "malicious":
        src = _malicious(tmp_path / "evil.ckpt", tmp_path / "pwned", "open", "torch.save")
    else:
        args = ["--vae", str(tmp_path / "no-vae.safetensors")]
    rc = main(["convert", str(src), str(out), "--config-dir", str(CONFIG), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("diffspeed: error: ")
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()
    assert (out.read_bytes() == b"keep me") if case == "exists" else not out.exists()
