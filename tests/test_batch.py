"""``diffspeed batch``: reading the three formats, chunking, resuming, determinism, and (slow) Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffspeed.batch import (
    RESULTS,
    Item,
    PromptsError,
    is_complete,
    items_from,
    make_chunks,
    read_prompts,
    run_batch,
)
from diffspeed.cli import main
from diffspeed.errors import DiffspeedError
from diffspeed.request import GenerateRequest

SMALL = {"steps": 4, "width": 64, "height": 64}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompts(n: int) -> list[dict]:
    shapes = ["circle", "square", "triangle", "star", "ring", "cross"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
    return [{"prompt": f"a {colors[i % 7]} {shapes[i % 6]} on a plain background, number {i}", **SMALL}
            for i in range(n)]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ reading
def test_jsonl_ids_seeds_and_relative_image_paths(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "start.png")
    path = write_jsonl(folder / "p.jsonl", [
        {"prompt": "a", "id": "first"},
        "",
        {"prompt": "b", "seed": 7, "batch_size": 2},
        {"prompt": "c", "init_image": "start.png", "id": 3},
        {"prompt": "d"},
    ])
    items = read_prompts(path, seed=100)
    assert [i.request.prompt for i in items] == ["a", "b", "c", "d"]
    assert [i.id for i in items] == ["first", None, "3", None]
    assert [i.line for i in items] == [1, 3, 4, 5]
    # no seed: --seed plus the images before it; a given seed stays
    assert [i.request.seed for i in items] == [100, 7, 103, 104]
    assert items[2].request.init_image == str(folder / "start.png")
    assert items[1].files == ["00001-7-0.png", "00001-7-1.png"] and items[1].seeds == [7, 8]
    assert items[0].files == ["00000-100.png"]


def test_csv_converts_by_field_type(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,steps,cfg_scale,inpaint_overlay,negative_prompt,sampler\n'
                    'x,"a, quoted prompt",4,2.5,false,blurry,Euler a\n'
                    '\n'
                    'y,plain,,,,,\n')
    a, b = read_prompts(path)
    assert (a.id, a.request.prompt, a.request.steps, a.request.cfg_scale) == ("x", "a, quoted prompt", 4, 2.5)
    assert a.request.inpaint_overlay is False and a.request.negative_prompt == "blurry"
    assert a.request.sampler == "Euler a" and a.line == 2
    assert (b.request.steps, b.request.cfg_scale, b.request.sampler, b.line) == (None, None, None, 4)


def test_txt_one_prompt_a_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n  a cat  \n\nA dog, sitting\n#another\n")
    items = read_prompts(path, seed=5)
    assert [(i.request.prompt, i.line, i.request.seed) for i in items] == [("a cat", 2, 5), ("A dog, sitting", 4, 6)]


def test_every_problem_at_once_with_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"},
        "{not json",
        {"prompt": "x", "steps": 0, "width": 65},
        ["a list"],
        {"prompt": "x", "colour": "red"},
        {"prompt": "x", "init_image": "missing.png"},
    ])
    with pytest.raises(PromptsError) as caught:
        read_prompts(path)
    lines = [n for n, _ in caught.value.problems]
    assert lines == [2, 3, 3, 4, 5, 6]
    text = str(caught.value)
    assert "line 2: not a JSON object" in text and "colour" in text and "missing.png" in text
    assert "6 problems" in text and caught.value.field == "prompts"


def test_csv_problems(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,steps,colour,mask_invert\nok,4,,true\nbad,four,,\nworse,4,,maybe\nshort\n")
    with pytest.raises(PromptsError) as caught:
        read_prompts(path)
    assert [n for n, _ in caught.value.problems] == [1, 3, 4, 5]
    assert "'colour'" in str(caught.value) and "'four' is not an int" in str(caught.value)


def test_cli_reports_problems_before_loading(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "steps": -1}, {"prompt": 3}])
    assert main(["batch", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 1: steps" in err and "line 2: prompt" in err
    assert not (tmp_path / "out" / RESULTS).exists()
    assert main(["batch", str(path), "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("prompt: a\n")
    assert main(["batch", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")]) == 2


def test_chunks_group_consecutive_compatible_requests():
    reqs = [{"prompt": "a", **SMALL}, {"prompt": "b", **SMALL}, {"prompt": "c", **SMALL, "batch_size": 2},
            {"prompt": "d", "steps": 5}, {"prompt": "e", **SMALL}, {"prompt": "f", **SMALL},
            {"prompt": "g", **SMALL, "batch_size": 4}]
    items = items_from(reqs, check_files=False)
    groups = [[i.request.prompt for i in c] for c in make_chunks(items, 3)]
    assert groups == [["a", "b"], ["c"], ["d"], ["e", "f"], ["g"]]
    assert [[i.request.prompt for i in c] for c in make_chunks(items, 1)] == [[p] for p in "abcdefg"]


# ------------------------------------------------------------------------------------------------ generating
@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """The same 6 prompts run with batch size 2 into ``a``, then again into ``b``, and with batch size 1 into
    ``c`` (one model load each)."""
    root = tmp_path_factory.mktemp("batch")
    path = write_jsonl(root / "p.jsonl", [{**p, "id": f"p{i}"} for i, p in enumerate(prompts(6))])
    runs = {}
    for name, size in (("a", 2), ("b", 2), ("c", 1)):
        runs[name] = run_batch(path, root / name, batch_size=size, progress=False, threads=1)
    return root, path, runs


def test_outputs_results_and_determinism(six):
    root, _, runs = six
    assert runs["a"].images == 6 and runs["a"].skipped == 0
    names = pngs(root / "a")
    assert names == [f"{i:05d}-{i}.png" for i in range(6)]
    rows = results(root / "a")
    assert [r["index"] for r in rows] == list(range(6)) and [r["id"] for r in rows] == [f"p{i}" for i in range(6)]
    assert rows[3]["files"] == ["00003-3.png"] and rows[3]["seeds"] == [3] and rows[3]["request"]["steps"] == 4
    assert rows[3]["request"]["sampler"] == "DPM++ 2M" and rows[3]["seconds"] > 0
    assert rows[3]["chunk_requests"] == 2 and rows[3]["stats"]["batched_requests"] == 2
    from diffspeed.pngmeta import read_parameters

    params = read_parameters(root / "a" / names[3])
    assert params["Seed"] == "3" and params["prompt"] == prompts(6)[3]["prompt"] and params["Steps"] == "4"
    for name in names:
        a, b, c = (pixels(root / run / name) for run in "abc")
        assert np.array_equal(a, b), name  # the same chunks: bit-identical
        assert np.abs(a - c).max() <= 1, name  # batched vs alone: at most one level


def test_resume_redoes_exactly_the_broken_outputs(six, tmp_path):
    root, path, _ = six
    out = tmp_path / "out"
    shutil.copytree(root / "a", out)
    names = pngs(out)
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[1]).unlink()  # deleted
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[: len(data) // 2])  # truncated
    Image.new("RGB", (64, 64)).save(out / names[4])  # decodes, but no parameters chunk
    kept = [r for r in results(root / "a") if r["index"] != 5]  # 5's line lost, as a killed run could leave it
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in kept + kept[:1]) + "{broken\n")
    items = read_prompts(path)
    assert [is_complete(i, out) for i in items] == [True, False, False, True, False, True]

    summary = run_batch(path, out, batch_size=2, progress=False, threads=1)
    assert (summary.images, summary.skipped) == (3, 3)
    assert {r["index"] for r in summary.rows} == {1, 2, 4}
    for n in names:
        assert np.array_equal(pixels(out / n), pixels(root / "a" / n)), n
        if n not in (names[1], names[2], names[4]):
            assert (out / n).stat().st_mtime_ns == before[n], f"{n} was rewritten"
    rows = results(out)
    assert [r["index"] for r in rows] == list(range(6))
    assert rows[5].get("recovered") is True and rows[5]["files"] == [names[5]]
    assert not list(out.glob(".*partial*"))

    again = run_batch(path, out, batch_size=2, progress=False)  # all complete: nothing loads, nothing runs
    assert (again.images, again.skipped) == (0, 6) and len(results(out)) == 6


def test_a_changed_prompt_is_redone(six, tmp_path):
    root, _, _ = six
    out = tmp_path / "out"
    shutil.copytree(root / "c", out)
    changed = prompts(6)
    changed[0]["prompt"] = "a different prompt"
    items = items_from(changed)
    assert [is_complete(i, out) for i in items] == [False] + [True] * 5


def test_cli_in_process_with_a_recipe(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("# two prompts\na red circle\na blue square\n")
    out = tmp_path / "out"
    args = ["batch", str(path), "--out", str(out), "--opt", "cfg_cutoff:fraction=0.5", "--batch-size", "2",
            "--seed", "40", "--quiet"]
    assert main(args) == 0
    assert "2 images, 0 skipped" in capsys.readouterr().out
    assert pngs(out) == ["00000-40.png", "00001-41.png"]
    from diffspeed.pngmeta import read_parameters

    params = read_parameters(out / "00001-41.png")
    assert "cfg_cutoff" in params["Diffspeed recipe"] and params["prompt"] == "a blue square"
    assert all(r["stats"] for r in results(out))
    assert main(args) == 0 and "0 images, 2 skipped" in capsys.readouterr().out


def test_api_refuses_workers_without_ray(tmp_path):
    with pytest.raises(DiffspeedError, match="need Ray"):
        run_batch(["a"], tmp_path, workers=2)


def test_item_wire_round_trip():
    item = Item(3, GenerateRequest(prompt="a", seed=9, **SMALL), "x")
    wire = item.to_wire(False)
    assert GenerateRequest.from_data(wire["request"]) == item.request and wire["write"] is False


# ------------------------------------------------------------------------------------------------ Ray
def _ray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (this test's Ray temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_ray_killed_and_resumed_matches_in_process(tmp_path):
    """40 prompts on a 2-actor Ray pool, the driver terminated after the first results, rerun to completion:
    exactly 40 complete, distinct outputs, pixel-equal to an in-process run with the same batch size."""
    pytest.importorskip("ray")
    path = write_jsonl(tmp_path / "p.jsonl", prompts(40))
    out, local = tmp_path / "ray", tmp_path / "local"
    ray_tmp = tempfile.mkdtemp(prefix="dsb", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffspeed", "batch", str(path), "--out", str(out), "--ray", "--workers", "2",
           "--batch-size", "2", "--quiet"]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / RESULTS).exists() and (out / RESULTS).read_text().strip():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        items = read_prompts(path)
        first = sum(is_complete(i, out) for i in items)
        assert 0 < first < 40, first
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{40 - first} images, {first} skipped" in done.stdout
    finally:
        time.sleep(1)
        for pid in _ray_processes(ray_tmp):  # only this test's cluster, if anything outlived its driver
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert all(is_complete(i, out) for i in items)
    assert [r["index"] for r in results(out)] == list(range(40))
    run_batch(path, local, batch_size=2, progress=False, threads=1)
    names = pngs(out)
    assert names == pngs(local) and len(names) == 40
    hashes = set()
    for n in names:
        a = pixels(out / n)
        assert np.array_equal(a, pixels(local / n)), n
        hashes.add(a.tobytes())
    assert len(hashes) == 40
