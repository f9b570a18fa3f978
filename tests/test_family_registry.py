"""A model family is one folder: its spec reaches config, CLI, API and documents with no shared edit.

The throwaway family ``toy-ocr`` is written into a temporary folder that is added to the ``models``
package's search path, exactly as a new ``models/<family>/`` folder would be; nothing else is touched.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures.server import data_url, png_bytes

from deepseek_ocr_server import cli, config, models
from deepseek_ocr_server.api.schemas import DecodeFields
from deepseek_ocr_server.documents.postprocess import GROUNDING, for_kind
from deepseek_ocr_server.models import model_class, registry
from deepseek_ocr_server.server import build_app
from deepseek_ocr_server.settings import SETTINGS

SPEC = """
from ..registry import FamilySpec

SPEC = FamilySpec(
    kind="toy-ocr",
    title="Toy OCR",
    model="deepseek_ocr_server.models.toyocr.model:ToyModel",
    repo="someone/toy-ocr",
    default_prompt="Read the toy.",
    prompts=("Read the toy.", "Count the toys."),
    defaults={"max_new_tokens": 33, "no_repeat_ngram_size": 0},
    quantize_skip=frozenset({"toy_vision"}),
    postprocess="grounding",
    test_checkpoint="deepseek_ocr_server.testing.fake:write_fake_checkpoint",
)
"""

MODEL = """
from deepseek_ocr_server.testing.fake import FakeOcrModel


class ToyModel(FakeOcrModel):
    kind = "toy-ocr"
"""


@pytest.fixture
def toy_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[registry.FamilySpec]:
    folder = tmp_path / "families" / "toyocr"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(
        '"""Toy OCR: a family that lives in one folder."""\n', encoding="utf-8"
    )
    (folder / "spec.py").write_text(textwrap.dedent(SPEC), encoding="utf-8")
    (folder / "model.py").write_text(textwrap.dedent(MODEL), encoding="utf-8")
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(folder.parent)])
    registry.rescan()
    try:
        yield registry.family("toy-ocr")
    finally:
        monkeypatch.undo()
        for name in [m for m in sys.modules if m.startswith("deepseek_ocr_server.models.toyocr")]:
            del sys.modules[name]
        registry.rescan()


def test_the_builtin_families_are_found_in_their_folders() -> None:
    kinds = registry.kinds()
    assert {"deepseek-ocr", "deepseek-ocr-2", "paddleocr-vl", "paddleocr-vl-1.5", "glm-ocr", "fake"} <= set(
        kinds
    )
    for spec in registry.families().values():
        assert model_class(spec.kind).kind == spec.kind  # the class it names declares the same kind
        assert spec.postprocess in ("grounding", "otsl", "plain")
        # the options it reads are request settings of the table, fields of every request body
        assert all(SETTINGS[name].request and name in DecodeFields.model_fields for name in spec.options)
        if spec.repo:  # a built-in entry: everything a user needs is declared
            assert spec.default_prompt and spec.test_checkpoint and spec.quantize_skip
            assert set(spec.defaults) <= set(config.INFERENCE_KEYS)


def test_a_new_folder_is_a_new_family_everywhere(toy_family: registry.FamilySpec, tmp_path: Path) -> None:
    assert toy_family.title == "Toy OCR" and "toy-ocr" in registry.kinds()
    # config: a built-in entry with the family's defaults and prompt, in the default file too
    s = config.load_settings({}, tmp_path / "new" / "config.toml")
    assert s.models["toy-ocr"].repo == "someone/toy-ocr"
    inf = s.inference_for("toy-ocr")
    assert (inf.max_new_tokens, inf.no_repeat_ngram_size) == (33, 0)
    assert s.inference_for("deepseek-ocr").max_new_tokens == 512  # the others keep theirs
    assert s.default_prompt("toy-ocr") == "Read the toy."
    text = config.default_config_toml()
    assert '[models.entries.toy-ocr]\nkind = "toy-ocr"\nrepo = "someone/toy-ocr"' in text
    assert "33 for toy-ocr" in text.split("\n[inference]\n")[1]  # "unset: 512, 33 for toy-ocr"
    custom = tmp_path / "custom.toml"
    custom.write_text('[models.entries.my-toy]\nkind = "toy-ocr"\nrepo = "me/toy"\n', encoding="utf-8")
    assert config.load_settings({"model": "my-toy"}, custom).inference_for("my-toy").max_new_tokens == 33
    # CLI: --model takes it and --help names it with its own default
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "toy-ocr" in help_text and "toy-ocr: 33" in help_text
    assert cli.settings_from_args(["--model", "toy-ocr", "--config", str(custom)]).active == "toy-ocr"
    # documents and int8: the spec's post-processor and vision modules
    assert for_kind("toy-ocr") is GROUNDING
    assert toy_family.is_vision("net.toy_vision.blocks.0.fc") and not toy_family.is_vision("net.lm_head")


def test_a_new_family_is_served(toy_family: registry.FamilySpec, tmp_path: Path) -> None:
    files = toy_family.build_test_checkpoint(tmp_path / "toy-ckpt")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[models]\nactive = "toy-ocr"\n[models.entries.toy-ocr]\nconfig = "{files.config}"\n'
        f'tokenizer = "{files.tokenizer}"\nweights = "{files.weights}"\n',
        encoding="utf-8",
    )
    app, manager = build_app(config.load_settings({"cache_dir": tmp_path / "cache"}, path))
    with TestClient(app) as client:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "toy-ocr" in listed
        image = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
        body = {"model": "toy-ocr", "messages": [{"role": "user", "content": [image]}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert manager.status().model_id == "toy-ocr"
        # request validation: the settings table's ranges apply to the new family's requests
        r = client.post("/v1/chat/completions", json={**body, "base_size": 10})
        assert r.status_code == 400 and r.json()["error"]["param"] == "base_size"
        r = client.post("/v1/chat/completions", json={**body, "model": "toy-ocr-typo"})
        assert r.status_code == 404


@pytest.mark.parametrize("kind", [f.kind for f in registry.builtin_families()])
def test_int8_skip_modules_name_the_vision_side(kind: str, tmp_path: Path) -> None:
    """Each name in ``quantize_skip`` is a module of the family's checkpoint (a typo would silently
    quantize the vision tower), and every vision tensor lies under one of them."""
    from safetensors import safe_open

    spec = registry.family(kind)
    d = Path(spec.build_test_checkpoint(tmp_path))
    keys: list[str] = []
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    parts = {p for k in keys for p in k.split(".")}
    assert spec.quantize_skip <= parts
    vision = {k for k in keys if spec.is_vision(k)}
    assert vision and len(vision) < len(keys)  # the vision side, not everything
    assert not any(
        spec.is_vision(k)
        for k in keys
        if k.startswith(("lm_head.", "model.layers.", "model.language_model.layers."))
    )
