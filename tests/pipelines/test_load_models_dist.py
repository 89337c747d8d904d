"""The shipped models are their own distribution, diffspeed-models (models/ in this repository): diffspeed finds
them through it, says in one line what to install when it is missing, and the tokenizers' shared BPE tables are
stored once."""

from __future__ import annotations

import subprocess
import sys

import pytest

import diffspeed
import diffspeed.pipelines.load as load_mod
from diffspeed import DiffspeedError
from diffspeed.cli import main
from diffspeed.pipelines.load import SHIPPED, installed_models_dir, models_dir, shipped_path

diffspeed_models = pytest.importorskip("diffspeed_models")

INSTALL = ("pip install diffspeed-models", "pip install -e ./models")


@pytest.fixture
def no_models(monkeypatch):
    """As if diffspeed-models were not installed: importing it fails (None in sys.modules)."""
    monkeypatch.setitem(sys.modules, "diffspeed_models", None)
    with pytest.raises(ImportError):
        import diffspeed_models  # noqa: F401
    assert installed_models_dir() is None


def _one_line_install_error(err: DiffspeedError, field: str) -> None:
    text = str(err)
    assert err.field == field and text.startswith(f"{field}: ") and "\n" not in text, text
    assert all(cmd in text for cmd in INSTALL), text


def test_shipped_names_live_in_the_models_distribution():
    root = diffspeed_models.MODELS_DIR
    assert models_dir() == installed_models_dir() == root and load_mod.MODELS_DIR == root
    assert set(SHIPPED) <= set(diffspeed_models.names())
    for name in SHIPPED:
        assert shipped_path(name) == diffspeed_models.model_path(name) == root / name
        assert (shipped_path(name) / "model_index.json").is_file()
    assert {"taesd-tiny", "tiny-sd-lora-monochrome", "tiny-sd-controlnet-mask"} <= set(diffspeed_models.names())
    assert diffspeed_models.__version__.split(".")[0] == "1"
    with pytest.raises(KeyError, match="no shipped model 'tiny-sd15'"):
        diffspeed_models.model_path("tiny-sd15")


def test_importing_the_models_package_is_free(tmp_path):
    code = ("import sys, diffspeed_models; diffspeed_models.model_path('tiny-sd'); "
            "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), sys.modules.keys()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_without_the_models_package_each_shipped_name_is_a_one_line_error(no_models):
    from diffspeed.pipelines.lora import resolve_lora_path
    from diffspeed.pipelines.workflows import controlnet_dir, refiner_dir

    with pytest.raises(DiffspeedError) as err:
        diffspeed.load("tiny-sd", device="cpu")
    _one_line_install_error(err.value, "model")
    assert "tiny-sd is a shipped model" in str(err.value)
    with pytest.raises(DiffspeedError) as err:
        resolve_lora_path("tiny-sd-lora-monochrome")
    _one_line_install_error(err.value, "lora")
    with pytest.raises(DiffspeedError) as err:
        controlnet_dir("tiny-sd-controlnet-mask")
    _one_line_install_error(err.value, "controlnet")
    with pytest.raises(DiffspeedError) as err:
        refiner_dir("tiny-sdxl-refiner")
    _one_line_install_error(err.value, "refiner")
    for lookup in (models_dir, lambda: load_mod.MODELS_DIR):
        with pytest.raises(DiffspeedError) as err:
            lookup()
        _one_line_install_error(err.value, "model")


def test_without_the_models_package_listings_are_empty(no_models):
    from diffspeed.resolve import Resolver

    resolver = Resolver()
    assert resolver.controlnet_names() == [] and resolver.refiner_names() == []


def test_without_the_models_package_the_cli_says_what_to_install(no_models, tmp_path, capsys):
    assert main(["generate", "a red circle", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "model" in err and all(cmd in err for cmd in INSTALL), err
    assert not list(tmp_path.glob("*.png"))


def test_the_bpe_tables_are_stored_once_and_every_shipped_tokenizer_matches_them():
    """vocab.json and merges.txt are only in diffspeed's configs/clip-tokenizer; a shipped tokenizer folder holds
    tokenizer.json (the same vocabulary and merges) and tokenizer_config.json, and tokenizes exactly like the
    tokenizer built from the shared tables."""
    from transformers import CLIPTokenizer

    from diffspeed.pipelines.single_file import TOKENIZER_DIR, clip_tokenizer

    assert (TOKENIZER_DIR / "vocab.json").is_file() and (TOKENIZER_DIR / "merges.txt").is_file()
    root = diffspeed_models.MODELS_DIR
    assert not [p for p in root.rglob("*") if p.name in ("vocab.json", "merges.txt")]
    folders = sorted(p.parent for p in root.glob("*/tokenizer*/tokenizer_config.json"))
    assert len(folders) == 4  # tiny-sd, tiny-sdxl (two), tiny-sdxl-refiner
    prompts = ["a red circle at top left on a blue background", "", "A  BIG green Square!! café 123", "x " * 90]
    shared = {pad: clip_tokenizer(pad_token=pad) for pad in (None, "!")}
    for folder in folders:
        shipped = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        same = shared["!" if shipped.pad_token == "!" else None]
        for kw in ({"padding": "max_length", "max_length": 77, "truncation": True}, {}):
            assert shipped(prompts, **kw).input_ids == same(prompts, **kw).input_ids, folder
        assert shipped.pad_token_id == same.pad_token_id and shipped.get_vocab() == same.get_vocab(), folder
