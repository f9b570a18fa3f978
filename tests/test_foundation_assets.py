"""Asset resolution: explicit path > config entry path > cache dir > download, and the real
huggingface_hub download code against a local fake Hub (no internet)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
from foundation_fakehub import FakeHub

from deepseek_ocr_server.assets import AssetError, resolve_model_files
from deepseek_ocr_server.config import Settings, load_settings

REPO = "acme/tiny-ocr"
SHARDED = "acme/tiny-sharded"

CONFIG = b'{"model_type": "tiny"}'
TOKENIZER = b'{"version": "1.0", "model": {}}'
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # an empty safetensors file
INDEX = json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-000002.safetensors",
                                                   "b": "model-00002-of-000002.safetensors"}}).encode()


def fake_repos() -> dict[str, dict[str, bytes]]:
    return {
        REPO: {
            "config.json": CONFIG,
            "tokenizer.json": TOKENIZER,
            "model.safetensors": WEIGHTS,
            "preprocessor_config.json": b"{}",
            "chat_template.jinja": b"{{ messages }}",
            "README.md": b"# not needed",
        },
        SHARDED: {
            "config.json": CONFIG,
            "tokenizer.json": TOKENIZER,
            "model.safetensors.index.json": INDEX,
            "model-00001-of-000002.safetensors": WEIGHTS + b"1",
            "model-00002-of-000002.safetensors": WEIGHTS + b"2",
            "modeling_x.py": b"# remote code, never fetched",
        },
    }


def settings_for(tmp_path: Path, repo: str = REPO, extra: str = "", cli: dict | None = None) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(f'[models.entries.tiny]\nkind = "deepseek-ocr"\nrepo = "{repo}"\n{extra}', encoding="utf-8")
    return load_settings({"cache_dir": tmp_path / "cache", **(cli or {})}, path)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fake Hub, with HF_ENDPOINT pointed at it, a private HF_HOME, and offline mode off."""
    with FakeHub(fake_repos()) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # huggingface_hub reads HF_HUB_OFFLINE at import time; tests/conftest.py sets it to 1
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield h


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_download_from_local_hub_into_cache_layout(tmp_path: Path, hub: FakeHub) -> None:
    s = settings_for(tmp_path)
    files = resolve_model_files(s, "tiny")
    model_dir = tmp_path / "cache" / "models" / "tiny"
    assert files.config == model_dir / "config.json" and files.config.read_bytes() == CONFIG
    assert files.tokenizer == model_dir / "tokenizer.json" and files.tokenizer.read_bytes() == TOKENIZER
    assert files.weights == model_dir / "model.safetensors" and files.weights.read_bytes() == WEIGHTS
    assert files.extras_dir == model_dir
    assert files.extra("preprocessor_config.json") == model_dir / "preprocessor_config.json"
    assert files.extra("chat_template.jinja") is not None
    assert not (model_dir / "README.md").exists()
    # the blobs live in the Hugging Face cache under HF_HOME (shareable); ours are links/copies of them
    assert list((tmp_path / "hf" / "hub").glob("models--acme--tiny-ocr/snapshots/*/model.safetensors"))
    assert not list(model_dir.glob("*.incomplete")) and not list(model_dir.glob(".*.tmp"))
    got = sorted(p.rsplit("/", 1)[1] for p in hub.downloads())
    assert got == ["chat_template.jinja", "config.json", "model.safetensors", "preprocessor_config.json",
                   "tokenizer.json"]


def test_download_reports_bytes_per_file(tmp_path: Path, hub: FakeHub) -> None:
    """huggingface_hub's progress bar hook tells ``report`` how far each file got (``/health`` shows it)."""
    seen: dict[str, list[tuple[int, int | None]]] = {}
    resolve_model_files(settings_for(tmp_path), "tiny", report=lambda f, d, t: seen.setdefault(f, []).append((d, t)))
    for name, data in (("config.json", CONFIG), ("tokenizer.json", TOKENIZER), ("model.safetensors", WEIGHTS)):
        assert seen[name][0] == (0, len(data)), seen  # announced before the first byte
        assert seen[name][-1] == (len(data), len(data)), seen
    again: list[str] = []
    resolve_model_files(settings_for(tmp_path), "tiny", report=lambda f, d, t: again.append(f))
    assert again == []  # nothing downloaded, nothing reported


def test_second_resolve_does_not_touch_the_hub(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_for(tmp_path)
    first = resolve_model_files(s, "tiny")
    hub.requests.clear()
    # even with the whole Hugging Face cache gone, the model dir alone is enough
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    second = resolve_model_files(s, "tiny")
    assert second == first
    assert hub.requests == []


def test_sharded_repo_gets_index_and_every_shard(tmp_path: Path, hub: FakeHub) -> None:
    s = settings_for(tmp_path, repo=SHARDED)
    files = resolve_model_files(s, "tiny")
    d = tmp_path / "cache" / "models" / "tiny"
    assert files.weights == d / "model.safetensors.index.json"
    assert (d / "model-00001-of-000002.safetensors").read_bytes() == WEIGHTS + b"1"
    assert (d / "model-00002-of-000002.safetensors").read_bytes() == WEIGHTS + b"2"
    assert not (d / "modeling_x.py").exists()
    hub.requests.clear()
    assert resolve_model_files(s, "tiny") == files
    assert hub.requests == []


def test_missing_shard_in_cache_is_fetched_again(tmp_path: Path, hub: FakeHub) -> None:
    s = settings_for(tmp_path, repo=SHARDED)
    resolve_model_files(s, "tiny")
    d = tmp_path / "cache" / "models" / "tiny"
    (d / "model-00002-of-000002.safetensors").unlink()
    hub.requests.clear()
    resolve_model_files(s, "tiny")
    assert (d / "model-00002-of-000002.safetensors").is_file()
    assert any(p.endswith("/model-00002-of-000002.safetensors") for _, p in hub.requests)


def test_404_names_repo_file_and_how_to_supply_it(tmp_path: Path, hub: FakeHub) -> None:
    hub.repos[REPO].pop("tokenizer.json")
    s = settings_for(tmp_path)
    with pytest.raises(AssetError) as err:
        resolve_model_files(s, "tiny")
    msg = str(err.value)
    assert REPO in msg and "tokenizer.json" in msg and "404" in msg
    assert "--tokenizer" in msg and "[models.entries.tiny]" in msg and str(s.config_path) in msg
    assert not (tmp_path / "cache" / "models" / "tiny" / "tokenizer.json").exists()


def test_unknown_repo(tmp_path: Path, hub: FakeHub) -> None:
    s = settings_for(tmp_path, repo="acme/nope")
    with pytest.raises(AssetError, match=r"acme/nope.*repository not found.*--model-config"):
        resolve_model_files(s, "tiny")


def test_offline_without_cache_names_the_missing_asset(tmp_path: Path, offline: None) -> None:
    s = settings_for(tmp_path)
    with pytest.raises(AssetError) as err:
        resolve_model_files(s, "tiny")
    msg = str(err.value)
    assert "config.json" in msg and REPO in msg and "HF_HUB_OFFLINE" in msg and "--model-config" in msg


def test_offline_uses_files_already_in_the_hf_cache(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared HF_HOME: a second machine (new model cache dir) starts offline from the HF cache."""
    resolve_model_files(settings_for(tmp_path), "tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    other = settings_for(tmp_path, cli={"cache_dir": tmp_path / "cache2"})
    files = resolve_model_files(other, "tiny")
    assert files.weights == tmp_path / "cache2" / "models" / "tiny" / "model.safetensors"
    assert files.weights.read_bytes() == WEIGHTS
    assert files.extra("chat_template.jinja") is not None
    assert hub.requests == []


def test_download_off(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    with pytest.raises(AssetError, match="downloads are off"):
        resolve_model_files(s, "tiny", download=False)


def test_order_explicit_then_entry_then_cache(tmp_path: Path, offline: None) -> None:
    d = tmp_path / "cache" / "models" / "tiny"
    d.mkdir(parents=True)
    for name, data in (("config.json", CONFIG), ("tokenizer.json", TOKENIZER), ("model.safetensors", WEIGHTS)):
        (d / name).write_bytes(data)
    entry_w = tmp_path / "entry" / "w.safetensors"
    flag_w = tmp_path / "flag" / "w.safetensors"
    entry_t = tmp_path / "entry" / "tokenizer.json"
    for p in (entry_w, flag_w, entry_t):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")

    # cache dir only (files put there by hand, no download needed even offline)
    files = resolve_model_files(settings_for(tmp_path), "tiny")
    assert (files.config, files.tokenizer, files.weights) == (d / "config.json", d / "tokenizer.json",
                                                              d / "model.safetensors")
    # config entry paths beat the cache
    extra = f'weights = "{entry_w}"\ntokenizer = "{entry_t}"\n'
    files = resolve_model_files(settings_for(tmp_path, extra=extra), "tiny")
    assert (files.weights, files.tokenizer, files.config) == (entry_w, entry_t, d / "config.json")
    # a flag beats the entry (flags apply to the model chosen by --model)
    files = resolve_model_files(settings_for(tmp_path, extra=extra, cli={"model": "tiny", "weights": flag_w}), "tiny")
    assert (files.weights, files.tokenizer) == (flag_w, entry_t)


def test_explicit_path_missing_is_an_error(tmp_path: Path) -> None:
    s = settings_for(tmp_path, cli={"model": "tiny", "weights": tmp_path / "nope.safetensors"})
    with pytest.raises(AssetError, match=r"nope\.safetensors.*does not exist.*--weights"):
        resolve_model_files(s, "tiny")


def test_explicit_paths_win_and_skip_the_download(tmp_path: Path, hub: FakeHub) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "chat_template.jinja"):
        (ft / name).write_bytes(b"mine")
    s = settings_for(tmp_path, cli={"model": "tiny", "weights": ft / "model.safetensors",
                                    "tokenizer": ft / "tokenizer.json", "model_config": ft / "config.json"})
    files = resolve_model_files(s, "tiny")
    assert files.weights.read_bytes() == b"mine" and files.config == ft / "config.json"
    assert files.extra("chat_template.jinja") == ft / "chat_template.jinja"
    assert hub.requests == []


def test_only_the_missing_file_is_downloaded(tmp_path: Path, hub: FakeHub) -> None:
    w = tmp_path / "mine.safetensors"
    w.write_bytes(b"mine")
    s = settings_for(tmp_path, extra=f'weights = "{w}"\n')
    files = resolve_model_files(s, "tiny")
    assert files.weights == w
    names = {p.rsplit("/", 1)[1] for p in hub.downloads()}
    assert "model.safetensors" not in names and {"config.json", "tokenizer.json"} <= names


def test_revision_change_refetches(tmp_path: Path, hub: FakeHub, caplog: pytest.LogCaptureFixture) -> None:
    resolve_model_files(settings_for(tmp_path), "tiny")
    hub.requests.clear()
    with caplog.at_level(logging.INFO):
        resolve_model_files(settings_for(tmp_path, extra='revision = "v2"\n'), "tiny")
    assert any("/resolve/v2/model.safetensors" in p for _, p in hub.requests)
    assert "another repo/revision" in caplog.text
    marker = json.loads((tmp_path / "cache" / "models" / "tiny" / ".source.json").read_text())
    assert marker["revision"] == "v2"


def test_entry_without_repo_or_files(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[models.entries.local]\nkind = "paddleocr-vl"\n', encoding="utf-8")
    s = load_settings({"cache_dir": tmp_path / "cache"}, path)
    with pytest.raises(AssetError, match=r"has no `repo`.*--model-config"):
        resolve_model_files(s, "local")


def test_partial_fill_from_another_repo_is_not_reused(tmp_path: Path, hub: FakeHub) -> None:
    hub.repos[REPO].pop("tokenizer.json")
    with pytest.raises(AssetError):
        resolve_model_files(settings_for(tmp_path), "tiny")  # config.json landed, then 404
    files = resolve_model_files(settings_for(tmp_path, repo=SHARDED), "tiny")
    assert files.weights.name == "model.safetensors.index.json"
    assert any(p.endswith(f"{SHARDED}/resolve/main/config.json") for _, p in hub.requests)


def test_disk_full_is_explained(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from deepseek_ocr_server import assets

    def full(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets, "_place", full)
    with pytest.raises(AssetError, match=r"config\.json of model repo acme/tiny-ocr: no space left"):
        resolve_model_files(settings_for(tmp_path), "tiny")


def test_switching_repo_removes_the_previous_fill(tmp_path: Path, hub: FakeHub) -> None:
    """Sharded repo first, then a single-file repo: the old index must not shadow the new weights."""
    resolve_model_files(settings_for(tmp_path, repo=SHARDED), "tiny")
    d = tmp_path / "cache" / "models" / "tiny"
    (d / "notes.txt").write_text("mine")  # a file put there by hand survives
    files = resolve_model_files(settings_for(tmp_path, repo=REPO), "tiny")
    assert files.weights == d / "model.safetensors"
    assert not (d / "model.safetensors.index.json").exists()
    assert not (d / "model-00001-of-000002.safetensors").exists()
    assert (d / "notes.txt").is_file()
    hub.requests.clear()
    assert resolve_model_files(settings_for(tmp_path, repo=REPO), "tiny").weights == d / "model.safetensors"
    assert hub.requests == []


def test_cache_dir_with_a_lone_shard_and_no_index(tmp_path: Path, offline: None) -> None:
    """A hand-filled cache dir holding only DeepSeek-OCR's original single shard name is used as is."""
    d = tmp_path / "cache" / "models" / "tiny"
    d.mkdir(parents=True)
    for name, data in (("config.json", CONFIG), ("tokenizer.json", TOKENIZER),
                       ("model-00001-of-000001.safetensors", WEIGHTS)):
        (d / name).write_bytes(data)
    files = resolve_model_files(settings_for(tmp_path), "tiny")
    assert files.weights == d / "model-00001-of-000001.safetensors"
    # two unrelated lone files are ambiguous: not guessed (offline -> a clear error instead)
    (d / "other.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(AssetError):
        resolve_model_files(settings_for(tmp_path), "tiny")
