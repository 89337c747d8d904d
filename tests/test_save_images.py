"""save_images: exclusive names, temp-file-and-rename writes, and no overwrite across processes (fake results
of small PIL images: the writing is under test, not generation)."""

import importlib
import subprocess
import sys
import time

import pytest
from PIL import Image

from diffspeed.errors import DiffspeedRuntimeError
from diffspeed.generate import GenerateResult, save_images
from diffspeed.pngmeta import read_parameters

gen = importlib.import_module("diffspeed.generate")  # the module: the package's `generate` is the function

WRITER = """
import sys, time
from pathlib import Path
from PIL import Image
from diffspeed.generate import GenerateResult, save_images

folder, tag, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
while not go.exists():  # both writers start together, so they race for the same names
    time.sleep(0.002)
for i in range(8):  # one call per image: every call re-reads the folder, the worst case for numbering
    image = Image.new("RGB", (16, 16), (tag * 100, i * 20, 7))
    result = GenerateResult([image], [i], [f"cat\\nSteps: 1, Seed: {i}, Writer: {tag}"], 1.0, 1.0)
    print(*save_images(result, folder))
"""


def fake(n: int, seed: int = 5, colour=(1, 2, 3)) -> GenerateResult:
    images = [Image.new("RGB", (8, 8), colour) for _ in range(n)]
    return GenerateResult(images, [seed + i for i in range(n)], [f"cat\nSeed: {seed + i}" for i in range(n)],
                          1.0, 1.0)


def test_two_processes_into_one_folder_never_overwrite(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(tag), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in (1, 2)]
    time.sleep(0.5)  # let both import before the start signal (they wait for it either way)
    go.touch()
    results = [p.communicate(timeout=170) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    written = [line for stdout, _ in results for line in stdout.split()]
    files = sorted(out.iterdir())
    assert len(set(written)) == 16 and {str(f) for f in files} == set(written)  # no temp files left either
    seen = set()
    for f in files:
        meta = read_parameters(f)
        tag, seed = int(meta["Writer"]), int(meta["Seed"])
        with Image.open(f) as im:
            assert im.size == (16, 16) and im.getpixel((0, 0)) == (tag * 100, seed * 20, 7)
        assert f.name.endswith(f"-{seed}.png")
        seen.add((tag, seed))
    assert seen == {(t, i) for t in (1, 2) for i in range(8)}  # every image of both writers survived


def test_existing_files_are_kept_and_numbering_continues(tmp_path):
    (tmp_path / "00007-5.png").write_bytes(b"not mine")
    (tmp_path / "notes.txt").write_text("x")
    paths = save_images(fake(2), tmp_path)
    assert [p.name for p in paths] == ["00008-5.png", "00009-6.png"]
    assert (tmp_path / "00007-5.png").read_bytes() == b"not mine"
    assert read_parameters(paths[1])["Seed"] == "6"


def test_taken_name_moves_to_the_next_number(tmp_path, monkeypatch):
    (tmp_path / "00000-5.png").write_bytes(b"taken")
    monkeypatch.setattr(gen, "_next_number", lambda folder: 0)  # as if another process took it just now
    assert [p.name for p in save_images(fake(1), tmp_path)] == ["00001-5.png"]
    assert (tmp_path / "00000-5.png").read_bytes() == b"taken"


def test_failed_write_leaves_neither_temp_file_nor_reservation(tmp_path, monkeypatch):
    def half_then_fail(image, path, params):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gen, "save_png", half_then_fail)
    with pytest.raises(DiffspeedRuntimeError, match="No space left") as err:
        save_images(fake(1), tmp_path)
    assert err.value.field == "out" and err.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiffspeedRuntimeError) as err:
        save_images(fake(1), blocker / "sub")
    assert err.value.field == "out" and str(blocker) in str(err.value)
