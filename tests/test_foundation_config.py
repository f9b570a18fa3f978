"""config.toml: init, load, merge, precedence (one test per layer), validation, platform paths."""

from __future__ import annotations

import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest

from deepseek_ocr_server import config as cfg
from deepseek_ocr_server.config import (
    DEFAULT_CONFIG_TOML,
    ConfigError,
    InferenceDefaults,
    ServerSettings,
    load_settings,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- init ------------------------------------------------------------------------------------------
def test_missing_file_is_created_with_defaults_and_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "config.toml"
    s = load_settings({}, path)
    assert path.is_file()
    assert path.read_text(encoding="utf-8") == DEFAULT_CONFIG_TOML
    assert s.config_path == path
    assert s.active == "deepseek-ocr"


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", '[inference]\nmax_new_tokens = 77\n')
    before = path.read_bytes()
    s = load_settings({}, path)
    assert path.read_bytes() == before
    assert s.inference_for("deepseek-ocr").max_new_tokens == 77
    assert cfg.write_default_config(path) is False
    assert path.read_bytes() == before


def test_default_file_equals_builtin_defaults(tmp_path: Path) -> None:
    """The written template must describe exactly the built-in values (no drift between the two)."""
    data = tomllib.loads(DEFAULT_CONFIG_TOML)
    builtin = asdict(InferenceDefaults())
    for key, value in data["inference"].items():
        expected = builtin[key]
        if key in ("dtype", "quantize") and expected is None:
            assert value in ("auto", "none")
        else:
            assert value == expected, key
    # unset = None, commented out; no_repeat_ngram_size, image_size and max_new_tokens are left to the
    # per-family built-in (the families' specs)
    kind_keys = {"no_repeat_ngram_size", "image_size", "max_new_tokens"}
    assert set(builtin) - set(data["inference"]) == {"top_k", "seed", *kind_keys}
    assert data["server"] == {k: v for k, v in asdict(ServerSettings()).items() if k != "api_key"}
    assert set(data["models"]["entries"]) == set(cfg.builtin_models())
    # and parsing it gives the same Settings as no file at all
    a = load_settings({}, write(tmp_path / "full.toml", DEFAULT_CONFIG_TOML))
    b = load_settings({}, write(tmp_path / "empty.toml", ""))
    assert a.inference == b.inference and a.server == b.server and a.models == b.models
    assert all(a.inference_for(m) == b.inference_for(m) for m in cfg.builtin_models())


def test_default_config_path_honours_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cfg.default_config_path() == tmp_path / "cfg" / "deepseek-ocr" / "config.toml"
    assert cfg.default_cache_dir() == tmp_path / "cache" / "deepseek-ocr"
    s = load_settings({}, None)
    assert s.config_path.is_file() and s.config_path == tmp_path / "cfg" / "deepseek-ocr" / "config.toml"
    assert s.model_dir("paddleocr-vl") == tmp_path / "cache" / "deepseek-ocr" / "models" / "paddleocr-vl"


def test_cache_dir_from_file_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[models]\ncache_dir = "store"\n')
    assert load_settings({}, path).cache_dir == tmp_path / "store"  # relative to the config file
    assert load_settings({"cache_dir": tmp_path / "x"}, path).cache_dir == tmp_path / "x"


# --- models ----------------------------------------------------------------------------------------
def test_builtin_entries_always_exist(tmp_path: Path) -> None:
    """An older file with only one entry (or none) still gets both built-ins."""
    path = write(tmp_path / "c.toml", '[models]\nactive = "paddleocr-vl"\n[models.entries.paddleocr-vl]\nkind = "paddleocr-vl"\n')
    s = load_settings({}, path)
    assert s.models["deepseek-ocr"].repo == "deepseek-ai/DeepSeek-OCR"
    assert s.models["paddleocr-vl"].repo == "PaddlePaddle/PaddleOCR-VL"  # repo inherited from the built-in
    assert s.active == "paddleocr-vl"


def test_custom_entry_is_listed_and_keeps_its_values(tmp_path: Path) -> None:
    weights = write(tmp_path / "ft" / "model.safetensors", "x")
    path = write(
        tmp_path / "c.toml",
        f"""
[models.entries.my-ft]
kind = "deepseek-ocr"
repo = "me/my-ft"
revision = "v2"
weights = "{weights}"
tokenizer = "ft/tokenizer.json"
prompt = "<image>\\nFree OCR."
base_size = 640
crop_mode = false
""",
    )
    s = load_settings({"model": "my-ft"}, path)
    assert list(s.models) == [*cfg.builtin_models(), "my-ft"]
    e = s.models["my-ft"]
    assert (e.kind, e.repo, e.revision, e.weights) == ("deepseek-ocr", "me/my-ft", "v2", weights)
    assert e.tokenizer == tmp_path / "ft" / "tokenizer.json"  # relative to the config file
    assert s.active == "my-ft"
    assert s.default_prompt("my-ft") == "<image>\nFree OCR."
    inf = s.inference_for("my-ft")
    assert (inf.base_size, inf.crop_mode) == (640, False)
    assert s.inference_for("deepseek-ocr").base_size == 1024  # other models untouched


def test_default_prompts() -> None:
    s = cfg.Settings(config_path=Path("/nonexistent/c.toml"), cache_dir=Path("/nonexistent"))  # built-ins only
    assert s.default_prompt("deepseek-ocr") == "<image>\n<|grounding|>Convert the document to markdown."
    assert s.default_prompt("paddleocr-vl") == "OCR:"


def test_unknown_active_model(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[models]\nactive = "nope"\n')
    with pytest.raises(ConfigError, match=r"models\.active: unknown model 'nope'"):
        load_settings({}, path)
    with pytest.raises(ConfigError, match=r"--model: unknown model 'zzz'.*deepseek-ocr, deepseek-ocr-2, .*paddleocr-vl"):
        load_settings({"model": "zzz"}, write(tmp_path / "d.toml", ""))


def test_path_flags_apply_to_the_selected_model(tmp_path: Path) -> None:
    s = load_settings(
        {"model": "paddleocr-vl", "weights": tmp_path / "w.safetensors", "tokenizer": tmp_path / "t.json",
         "model_config": tmp_path / "c.json"},
        write(tmp_path / "c.toml", ""),
    )
    e = s.models["paddleocr-vl"]
    assert (e.weights, e.tokenizer, e.config) == (tmp_path / "w.safetensors", tmp_path / "t.json", tmp_path / "c.json")
    assert s.models["deepseek-ocr"].weights is None


# --- precedence: one test per layer -----------------------------------------------------------------
def test_layer_builtin(tmp_path: Path) -> None:
    inf = load_settings({}, write(tmp_path / "c.toml", "")).inference_for("deepseek-ocr")
    assert inf == replace_dtype(InferenceDefaults(), "auto")
    assert (inf.max_new_tokens, inf.no_repeat_ngram_size, inf.top_k, inf.seed) == (512, 20, None, None)


def test_layer_inference_section(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[inference]\nmax_new_tokens = 100\ntemperature = 0.5\ntop_k = 7\n")
    s = load_settings({}, path)
    for mid in ("deepseek-ocr", "paddleocr-vl"):
        inf = s.inference_for(mid)
        assert (inf.max_new_tokens, inf.temperature, inf.top_k) == (100, 0.5, 7)
        assert inf.top_p == 1.0  # untouched keys stay built-in


def test_layer_model_entry_over_inference_section(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        "[inference]\nmax_new_tokens = 100\n[models.entries.paddleocr-vl]\nmax_new_tokens = 200\ndtype = \"f32\"\n",
    )
    s = load_settings({}, path)
    assert s.inference_for("paddleocr-vl").max_new_tokens == 200
    assert s.inference_for("paddleocr-vl").dtype == "f32"
    assert s.inference_for("deepseek-ocr").max_new_tokens == 100


def test_layer_cli_over_everything(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        "[inference]\nmax_new_tokens = 100\ntop_k = 5\n[models.entries.paddleocr-vl]\nmax_new_tokens = 200\n"
        "[server]\nport = 9000\nhost = \"127.0.0.1\"\nprefill_slice_s = 0.5\n",
    )
    assert load_settings({}, path).server.prefill_slice_s == 0.5
    assert load_settings({"prefill_slice": 0.0}, path).server.prefill_slice_s == 0.0
    s = load_settings({"max_new_tokens": 300, "top_k": None, "port": 9100, "queue_timeout": 5.0}, path)
    assert s.inference_for("paddleocr-vl").max_new_tokens == 300
    assert s.inference_for("deepseek-ocr").max_new_tokens == 300
    assert s.inference_for("deepseek-ocr").top_k is None  # `--top-k none` beats the file
    assert (s.server.port, s.server.host, s.server.queue_timeout_s) == (9100, "127.0.0.1", 5.0)


def test_dtype_defaults_by_device(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "")
    cpu = load_settings({}, path).inference_for("deepseek-ocr")
    assert cpu.dtype == "auto" and cpu.torch_dtype() is None  # per phase by the CPU class (models/precision.py)
    assert load_settings({"device": "cuda"}, path).inference_for("deepseek-ocr").dtype == "bf16"
    assert load_settings({"device": "metal"}, path).inference_for("deepseek-ocr").dtype == "f16"
    assert load_settings({"device": "metal"}, path).inference_for("deepseek-ocr").torch_device() == "mps"
    # an explicit dtype wins; `auto` on the command line resets a file's dtype to the device default
    path2 = write(tmp_path / "d.toml", '[inference]\ndtype = "f32"\n')
    assert load_settings({}, path2).inference_for("deepseek-ocr").dtype == "f32"
    assert load_settings({"dtype": None}, path2).inference_for("deepseek-ocr").dtype == "auto"


def test_api_key_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "d.toml", '[server]\napi_key = "from-file"\n')
    assert load_settings({}, path).server.api_key == "from-file"
    assert load_settings({}, write(tmp_path / "c.toml", "")).server.api_key is None
    monkeypatch.setenv("DEEPSEEK_OCR_API_KEY", "from-env")
    assert load_settings({}, write(tmp_path / "c.toml", "")).server.api_key == "from-env"
    assert load_settings({}, path).server.api_key == "from-env"
    assert load_settings({"api_key": "from-flag"}, path).server.api_key == "from-flag"


def test_unreadable_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe[inference]")
    with pytest.raises(ConfigError, match="not a UTF-8"):
        load_settings({}, path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({}, tmp_path)  # a directory


def test_sampling_and_vision_views(tmp_path: Path) -> None:
    s = load_settings({"do_sample": True, "temperature": 0.7, "seed": 3, "crop_mode": False},
                      write(tmp_path / "c.toml", ""))
    inf = s.inference_for("deepseek-ocr")
    sp = inf.sampling()
    sp.validate()
    assert (sp.do_sample, sp.temperature, sp.seed, sp.no_repeat_ngram_size) == (True, 0.7, 3, 20)
    assert inf.options("deepseek-ocr") == {"base_size": 1024, "image_size": 640, "crop_mode": False}
    assert s.options_for("deepseek-ocr-2")["image_size"] == 768 and s.options_for("paddleocr-vl") == {}


def replace_dtype(inf: InferenceDefaults, dtype: str) -> InferenceDefaults:
    from dataclasses import replace

    return replace(inf, dtype=dtype)


# --- malformed files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[inference\nx = 1", "", "invalid TOML"),
        ('[models.entries.foo]\nkind = "llama"\n', "models.entries.foo.kind", "unknown model kind 'llama'"),
        ("[models.entries.foo]\nrepo = \"a/b\"\n", "models.entries.foo.kind", "missing"),
        ('[inference]\nmax_new_tokens = "many"\n', "inference.max_new_tokens", "expected an integer"),
        ("[inference]\ncrop_mode = 1\n", "inference.crop_mode", "expected true or false"),
        ("[inference]\ntemperature = -1.0\n", "inference.temperature", "must be >= 0.0"),
        ("[inference]\ntop_p = 1.5\n", "inference.top_p", "must be <= 1.0"),
        ('[inference]\ndevice = "tpu"\n', "inference.device", "must be one of cpu, cuda, metal"),
        ('[inference]\ndtype = "f8"\n', "inference.dtype", "must be one of f32, f16, bf16"),
        ("[inference]\nmax_new_token = 5\n", "inference.max_new_token", "unknown key (did you mean 'max_new_tokens'?"),
        ("[server]\nport = 70000\n", "server.port", "must be <= 65535"),
        ("[server]\nbogus = true\n", "server.bogus", "unknown key"),
        ("[extra]\na = 1\n", "extra", "unknown key"),
        ("[models]\nactive = 3\n", "models.active", "expected a model id string"),
        ("[models.entries.deepseek-ocr]\nbase_size = 0\n", "models.entries.deepseek-ocr.base_size", "must be >= 64"),
        ("[models.entries.deepseek-ocr]\nweights = 5\n", "models.entries.deepseek-ocr.weights", "expected a path"),
        ("[models.entries.deepseek-ocr]\nwieghts = \"x\"\n", "models.entries.deepseek-ocr.wieghts", "unknown key"),
        ('[models.entries.deepseek-ocr]\nrepo = "noslash"\n', "models.entries.deepseek-ocr.repo", "owner/name"),
        ("inference = 3\n", "inference", "expected a table"),
    ],
)
def test_malformed_config_names_file_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings({}, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    assert key in msg and problem in msg, msg


def test_platform_paths_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs
    import platformdirs.macos

    monkeypatch.setattr(platformdirs, "PlatformDirs", platformdirs.macos.MacOS)
    home = Path.home()
    assert cfg.default_config_path() == home / "Library/Application Support/deepseek-ocr/config.toml"
    assert cfg.default_cache_dir() == home / "Library/Caches/deepseek-ocr"


def test_platform_paths_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs
    import platformdirs.windows

    folders = {"CSIDL_APPDATA": "/win/Roaming", "CSIDL_LOCAL_APPDATA": "/win/Local"}
    monkeypatch.setattr(platformdirs.windows, "get_win_folder", folders.__getitem__)
    monkeypatch.setattr(platformdirs, "PlatformDirs", platformdirs.windows.Windows)
    assert cfg.default_config_path() == Path("/win/Roaming/deepseek-ocr/config.toml")  # %APPDATA%
    assert cfg.default_cache_dir() == Path("/win/Local/deepseek-ocr")  # %LOCALAPPDATA%, no "Cache" below


def test_kind_defaults_are_the_lowest_layer(tmp_path: Path) -> None:
    """PaddleOCR-VL decodes without the n-gram ban by default (its reference has none); [inference] and
    flags still override that built-in."""
    s = load_settings({}, write(tmp_path / "c.toml", ""))
    assert s.inference_for("paddleocr-vl").no_repeat_ngram_size == 0
    assert s.inference_for("deepseek-ocr").no_repeat_ngram_size == 20
    # the default file written on first start leaves it unset, so the kind default holds there too
    s = load_settings({}, tmp_path / "new" / "config.toml")
    assert s.inference_for("paddleocr-vl").no_repeat_ngram_size == 0
    s = load_settings({}, write(tmp_path / "d.toml", "[inference]\nno_repeat_ngram_size = 30\n"))
    assert s.inference_for("paddleocr-vl").no_repeat_ngram_size == 30
    s = load_settings({"no_repeat_ngram_size": 5}, write(tmp_path / "e.toml", ""))
    assert s.inference_for("paddleocr-vl").no_repeat_ngram_size == 5
