"""Settings: built-in defaults <- config.toml <- command-line flags, resolved in exactly ONE place.

Layers, lowest first:

1. built-in defaults (the settings table of ``settings.py``; the families' own defaults and built-in
   entries from their specs, ``models/<family>/spec.py``);
2. ``config.toml``: ``[inference]``, then the per-model values of ``[models.entries.<id>]``
   (per-model values win over ``[inference]``), ``[server]``, ``[models].active``;
3. command-line flags, but only those the user actually passed (``cli_overrides``).

The request body overrides for one request; that last layer lives in the API.

Everything else (api/, engine/, assets) reads the result through :class:`Settings`:
``settings.inference_for(model_id)``, ``settings.default_prompt(model_id)``, ``settings.server``,
``settings.models[model_id]``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

import platformdirs

from . import settings as settings_table
from .models import registry
from .settings import SETTINGS

APP_NAME = "deepseek-ocr"
API_KEY_ENV = "DEEPSEEK_OCR_API_KEY"

#: dtype used when none is configured; see :func:`default_dtype`. ``auto`` on CPU: each phase in the
#: precision the processor runs fast (``models/precision.py``: bf16 with native bf16, else f32 compute
#: over bf16-stored weights).
DEFAULT_DTYPE_BY_DEVICE = {"cpu": "auto", "cuda": "bf16", "metal": "f16"}
#: the model preloaded when neither the file nor ``--model`` names one
DEFAULT_ACTIVE = "deepseek-ocr"


def model_kinds() -> tuple[str, ...]:
    """Kinds in the model registry (``models/<family>/spec.py``)."""
    return registry.kinds()


class ConfigError(Exception):
    """A bad config file or flag value. The message names the file (or flag), the key and the problem."""


# --------------------------------------------------------------------------------------------------
# dataclasses: one field per setting of the table (``settings.py``), with its default
# --------------------------------------------------------------------------------------------------
class _InferenceMethods:
    device: str
    dtype: str | None

    @property
    def effective_dtype(self) -> str:
        return self.dtype or default_dtype(self.device)

    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` of :attr:`effective_dtype` (imports torch lazily); None for ``auto`` (the
        model load picks each phase's precision by the CPU class)."""
        import torch

        if self.effective_dtype == "auto":
            return None
        return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[self.effective_dtype]

    def torch_device(self) -> str:
        """The torch device string: ``cpu``, ``cuda`` or ``mps`` (for ``metal``)."""
        return "mps" if self.device == "metal" else self.device

    def sampling(self) -> Any:
        """These defaults as :class:`~deepseek_ocr_server.sampling.SamplingParams`."""
        from .sampling import SamplingParams  # lazily: the config layer does not import torch

        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})

    def options(self, kind: str) -> dict[str, Any]:
        """These defaults of the request options a family reads (its spec's ``options``)."""
        return {name: getattr(self, name) for name in registry.family(kind).options}


InferenceDefaults = make_dataclass(
    "InferenceDefaults", settings_table.dataclass_fields("inference"), bases=(_InferenceMethods,), frozen=True
)
InferenceDefaults.__doc__ = """Server-side defaults of one model's inference: the ``[inference]`` settings of
``settings.py``. ``dtype=None`` means "the device's default" (:func:`default_dtype`);
:meth:`Settings.inference_for` always returns it resolved."""
INFERENCE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(InferenceDefaults))


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: ``[models.entries.<id>]``.

    ``config``/``tokenizer``/``weights``: explicit file paths (None = cache dir, then download).
    ``prompt``: default task prompt when a request has an image but no text (None = the kind's built-in).
    ``overrides``: per-model inference values (keys of :class:`InferenceDefaults`), above ``[inference]``.
    """

    id: str
    kind: str
    repo: str | None = None
    revision: str = "main"
    config: Path | None = None
    tokenizer: Path | None = None
    weights: Path | None = None
    prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    #: ``[models.entries.<id>.ray]``: keys of :class:`RayDeploymentSettings` (cluster mode only)
    ray: dict[str, Any] = field(default_factory=dict)


ServerSettings = make_dataclass("ServerSettings", settings_table.dataclass_fields("server"), frozen=True)
ServerSettings.__doc__ = "The ``[server]`` settings of ``settings.py``: limits, auth, CORS, HTTP."
SERVER_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ServerSettings))

#: the resolutions a PDF page may be rendered at (config ``pdf_dpi`` and a request's ``dpi``)
PDF_DPI_RANGE = (int(SETTINGS["pdf_dpi"].lo or 0), int(SETTINGS["pdf_dpi"].hi or 0))


class _RayDoc:
    """One model's Ray Serve deployment (cluster mode only): ``[models.entries.<id>.ray]``, the
    ``--ray-*`` flags over it. ``max_replicas`` None means ``min_replicas`` (a fixed replica count, no
    autoscaling); above it, Serve autoscales on ongoing requests per replica
    (``target_ongoing_requests``, None: the replica's ``max_running``). ``min_replicas = 0`` scales from
    zero (up to ``max_replicas``, at least 1). ``num_cpus`` is also the replica's torch thread count."""


RayDeploymentSettings = make_dataclass(
    "RayDeploymentSettings", settings_table.dataclass_fields("ray"), bases=(_RayDoc,), frozen=True
)
RayDeploymentSettings.__doc__ = _RayDoc.__doc__
for _cls in (InferenceDefaults, ServerSettings, RayDeploymentSettings):
    _cls.__module__ = __name__  # pickling (Ray ships settings to replicas) finds them here
RAY_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RayDeploymentSettings))


def builtin_models() -> dict[str, ModelEntry]:
    """The built-in model entries: one per registered family with a repo, id = kind."""
    return {f.kind: ModelEntry(id=f.kind, kind=f.kind, repo=f.repo) for f in registry.builtin_families()}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs, after merging all layers.

    ``inference`` is the ``[inference]`` layer over the built-ins; ``cli_inference`` holds the
    inference flags the user passed. Use :meth:`inference_for` for a model's effective values.
    """

    config_path: Path
    cache_dir: Path
    active: str = DEFAULT_ACTIVE
    models: dict[str, ModelEntry] = field(default_factory=builtin_models)
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    server: ServerSettings = field(default_factory=ServerSettings)
    cli_inference: dict[str, Any] = field(default_factory=dict)
    #: the keys ``[inference]`` of the file sets (over the kind's built-in defaults)
    file_inference: dict[str, Any] = field(default_factory=dict)
    #: the ``--ray-*`` flags the user passed (keys of :class:`RayDeploymentSettings`), for every model
    cli_ray: dict[str, Any] = field(default_factory=dict)

    def entry(self, model_id: str) -> ModelEntry:
        try:
            return self.models[model_id]
        except KeyError:
            raise KeyError(f"unknown model {model_id!r}; configured: {', '.join(self.models)}") from None

    def inference_for(self, model_id: str) -> InferenceDefaults:
        """CLI flag > per-model entry value > ``[inference]`` > built-in; ``dtype`` resolved."""
        entry = self.entry(model_id)
        merged = replace(self.inference, **registry.family(entry.kind).defaults)
        merged = replace(merged, **self.file_inference)
        merged = replace(merged, **entry.overrides)
        merged = replace(merged, **self.cli_inference)
        return replace(merged, dtype=merged.effective_dtype)

    def options_for(self, model_id: str) -> dict[str, Any]:
        """The model's request options (its family's ``options``) at their configured values."""
        return self.inference_for(model_id).options(self.entry(model_id).kind)

    def ray_for(self, model_id: str) -> RayDeploymentSettings:
        """Cluster mode: ``--ray-*`` flag > ``[models.entries.<id>.ray]`` > built-in; checked as a whole."""
        merged = replace(RayDeploymentSettings(), **self.entry(model_id).ray)
        merged = replace(merged, **self.cli_ray)
        if merged.max_replicas is not None and merged.max_replicas < merged.min_replicas:
            raise ConfigError(
                f"{model_id}: ray max_replicas ({merged.max_replicas}) is below min_replicas ({merged.min_replicas})"
            )
        return merged

    def default_prompt(self, model_id: str) -> str:
        e = self.entry(model_id)
        return e.prompt if e.prompt is not None else registry.family(e.kind).default_prompt

    def model_dir(self, model_id: str) -> Path:
        """``<cache>/models/<id>``: where the model's files live once resolved."""
        return self.cache_dir / "models" / model_id


# --------------------------------------------------------------------------------------------------
# platform paths
# --------------------------------------------------------------------------------------------------
def _platform_dirs() -> platformdirs.PlatformDirsABC:
    # roaming: %APPDATA% (not %LOCALAPPDATA%) for the config on Windows; opinion=False: no extra
    # "Cache" folder under %LOCALAPPDATA%\deepseek-ocr.
    return platformdirs.PlatformDirs(APP_NAME, appauthor=False, roaming=True, opinion=False)


def default_config_path() -> Path:
    """Linux ``$XDG_CONFIG_HOME/deepseek-ocr/config.toml`` (``~/.config``), macOS
    ``~/Library/Application Support/deepseek-ocr/config.toml``, Windows ``%APPDATA%\\deepseek-ocr\\config.toml``."""
    return Path(_platform_dirs().user_config_dir) / "config.toml"


def default_cache_dir() -> Path:
    """Linux ``$XDG_CACHE_HOME/deepseek-ocr`` (``~/.cache``), macOS ``~/Library/Caches/deepseek-ocr``,
    Windows ``%LOCALAPPDATA%\\deepseek-ocr``."""
    return Path(_platform_dirs().user_cache_dir)


def default_dtype(device: str) -> str:
    """cpu -> auto (per phase by the CPU class), cuda -> bf16, metal -> f16."""
    return DEFAULT_DTYPE_BY_DEVICE.get(device, "f32")


# --------------------------------------------------------------------------------------------------
# value checks, shared by the config loader and the command line
# --------------------------------------------------------------------------------------------------
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


def check_value(key: str, value: Any) -> Any:
    """Validate (and normalise) one inference/server/ray value (``settings``). Raises ValueError."""
    return settings_table.check(key, value)


def _api_key(v: Any) -> str | None:
    return SETTINGS["api_key"].check(v)


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


# --------------------------------------------------------------------------------------------------
# the default file
# --------------------------------------------------------------------------------------------------
_CONFIG_HEAD = """\
# deepseek-ocr-server configuration.
# Precedence: command-line flag > this file (a model entry's values over [inference]) > built-in default.
# A request body (max_tokens, temperature, ...) overrides for that request only.
# Keys left out (or commented out) take the built-in default shown here.

[models]
# Model preloaded at start (--model overrides). Requests pick any entry by its id ("model" field).
active = "{active}"
# Where downloaded models live: <cache_dir>/models/<id>/ (default: the platform cache dir).
# cache_dir = "/srv/deepseek-ocr-cache"
"""

_CUSTOM_ENTRY = """\
# A custom entry (a fine-tune of a supported kind) looks like this:
# [models.entries.my-finetune]
# kind = "deepseek-ocr"
# repo = "me/my-deepseek-ocr-finetune"
# weights = "/data/my-finetune/model.safetensors"
"""


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def _toml_key(key: str) -> str:
    """A bare TOML key when it can be one; quoted otherwise (``"paddleocr-vl-1.5"``: a dot separates keys)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml(key)


def _setting_line(s: settings_table.Setting, width: int) -> str:
    """One key of ``[inference]`` / ``[server]``: commented out when unset or when a family has its own
    default (the comment then says which)."""
    by_family = {f.kind: f.defaults[s.name] for f in registry.builtin_families() if s.name in f.defaults}
    note = s.note
    if s.request and s.group == "vision":  # a model family's option: which families read it
        note += f" ({' and '.join(registry.readers(s.name))} only)"
    if by_family:
        groups: dict[Any, list[str]] = {}
        for kind, v in by_family.items():
            groups.setdefault(v, []).append(kind)
        per = ", ".join(f"{_toml(v)} for {' and '.join(kinds)}" for v, kinds in groups.items())
        note = f"unset: {_toml(s.default)}, {per}" + (f"; {note}" if note else "")
    if s.default is None and not by_family and s.example is None:
        line = f"{s.name} = {_toml(s.none_word)}"
    elif s.default is None or by_family:
        line = f"# {s.name} = {_toml(s.default if s.default is not None else s.example)}"
    else:
        line = f"{s.name} = {_toml(s.default)}"
    return f"{line:<{width - 1}} # {note}" if note else line


def default_config_toml() -> str:
    """The default config file, generated from the family specs (``models/<family>/spec.py``) and the
    settings table (``settings.py``): the README shows it verbatim (a test checks it)."""
    out = [_CONFIG_HEAD.format(active=DEFAULT_ACTIVE)]
    for f in registry.builtin_families():
        lines = [f"[models.entries.{_toml_key(f.kind)}]", f"kind = {_toml(f.kind)}", f"repo = {_toml(f.repo)}",
                 'revision = "main"']
        prompt = f"# prompt = {_toml(f.default_prompt)}"
        lines += [c.replace("{prompt}", prompt) for c in f.config_comments]
        out.append("\n".join(lines) + "\n")
    out.append(_CUSTOM_ENTRY)
    for name, width in (("inference", 28), ("server", 35)):
        out.append(f"[{name}]\n" + "".join(_setting_line(s, width) + "\n" for s in settings_table.section(name)))
    return "\n".join(out)


DEFAULT_CONFIG_TOML = default_config_toml()


def write_default_config(path: Path) -> bool:
    """Write the default file at ``path`` unless something exists there. Returns True if written."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(DEFAULT_CONFIG_TOML, encoding="utf-8")
    try:
        # link() fails if the target appeared meanwhile: never overwrite a user's file.
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------
_ENTRY_KEYS = {"kind", "repo", "revision", "config", "tokenizer", "weights", "prompt"}
_CLI_PATH_KEYS = {"weights": "weights", "tokenizer": "tokenizer", "model_config": "config"}


class _FileErrors:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")


def _table(ctx: _FileErrors, data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = data.get(key, {})
    if not isinstance(v, dict):
        raise ctx.error(f"{where}{key}", f"expected a table, got {_show(v)}")
    return v


def _check(ctx: _FileErrors, where: str, key: str, value: Any) -> Any:
    try:
        return check_value(key, value)
    except ValueError as exc:
        raise ctx.error(f"{where}{key}", str(exc)) from None


def _unknown(ctx: _FileErrors, where: str, key: str, allowed: set[str] | tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ctx.error(f"{where}{key}", f"unknown key ({hint}allowed: {', '.join(sorted(allowed))})")


def _path(ctx: _FileErrors, where: str, v: Any) -> Path | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ctx.error(where, f"expected a path string, got {_show(v)}")
    p = Path(v).expanduser()
    if not p.is_absolute():
        p = (ctx.path.parent / p).resolve()  # relative paths are relative to the config file
    return p


def parse_config(text: str, path: Path) -> dict[str, Any]:
    """Parse and validate a config file's text. Returns the pieces :func:`load_settings` merges:
    ``{"active", "cache_dir", "entries", "inference", "server"}`` (only keys present in the file)."""
    ctx = _FileErrors(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None

    for key in data:
        if key not in ("models", "inference", "server"):
            raise _unknown(ctx, "", key, ("models", "inference", "server"))

    out: dict[str, Any] = {}
    models = _table(ctx, data, "models", "")
    for key in models:
        if key not in ("active", "cache_dir", "entries"):
            raise _unknown(ctx, "models.", key, ("active", "cache_dir", "entries"))
    if "active" in models:
        v = models["active"]
        if not isinstance(v, str) or not v:
            raise ctx.error("models.active", f"expected a model id string, got {_show(v)}")
        out["active"] = v
    if "cache_dir" in models:
        out["cache_dir"] = _path(ctx, "models.cache_dir", models["cache_dir"])

    entries: dict[str, ModelEntry] = {}
    for mid, raw in _table(ctx, models, "entries", "models.").items():
        where = f"models.entries.{mid}."
        if not isinstance(raw, dict):
            raise ctx.error(f"models.entries.{mid}", f"expected a table, got {_show(raw)}")
        base = builtin_models().get(mid)
        kind = raw.get("kind", base.kind if base else None)
        kinds = model_kinds()
        if kind is None:
            raise ctx.error(f"{where}kind", f"missing (one of {', '.join(kinds)})")
        if kind not in kinds:
            raise ctx.error(f"{where}kind", f"unknown model kind {kind!r} (known: {', '.join(kinds)})")
        kw: dict[str, Any] = {"id": mid, "kind": kind}
        if base and base.kind == kind:
            kw["repo"] = base.repo
        overrides: dict[str, Any] = {}
        for key, v in raw.items():
            if key == "kind":
                continue
            if key in ("repo", "revision", "prompt"):
                if not isinstance(v, str):
                    raise ctx.error(f"{where}{key}", f"expected a string, got {_show(v)}")
                if key == "repo" and v and v.count("/") != 1:
                    raise ctx.error(f"{where}{key}", f"expected a Hugging Face repo id 'owner/name', got {v!r}")
                if key == "revision":
                    kw[key] = v or "main"
                else:
                    kw[key] = v or None
            elif key in ("config", "tokenizer", "weights"):
                kw[key] = _path(ctx, f"{where}{key}", v)
            elif key in INFERENCE_KEYS:
                overrides[key] = _check(ctx, where, key, v)
            elif key == "ray":
                if not isinstance(v, dict):
                    raise ctx.error(f"{where}ray", f"expected a table, got {_show(v)}")
                ray_kw: dict[str, Any] = {}
                for rkey, rv in v.items():
                    if rkey not in RAY_KEYS:
                        raise _unknown(ctx, f"{where}ray.", rkey, RAY_KEYS)
                    ray_kw[rkey] = _check(ctx, f"{where}ray.", rkey, rv)
                kw["ray"] = ray_kw
            else:
                raise _unknown(ctx, where, key, _ENTRY_KEYS | {"ray"} | set(INFERENCE_KEYS))
        kw["overrides"] = overrides
        entries[mid] = ModelEntry(**kw)
    out["entries"] = entries

    for name, keys in (("inference", INFERENCE_KEYS), ("server", SERVER_KEYS)):
        checked: dict[str, Any] = {}
        for key, v in _table(ctx, data, name, "").items():
            if key not in keys:
                raise _unknown(ctx, f"{name}.", key, keys)
            checked[key] = _check(ctx, f"{name}.", key, v)
        out[name] = checked
    return out


def load_settings(cli_overrides: dict[str, Any] | None = None, config_path: Path | None = None) -> Settings:
    """Build :class:`Settings`: built-ins <- config file (created with defaults if missing) <- flags.

    ``cli_overrides``: ONLY the flags the user passed, keyed by argparse dest (``base_size``,
    ``model``, ``weights``, ``model_config``, ``queue_timeout``, ...). ``--weights``/``--tokenizer``/
    ``--model-config`` apply to the model selected by ``model`` (or the file's active model).
    Raises :class:`ConfigError`.
    """
    cli = dict(cli_overrides or {})
    path = Path(config_path).expanduser() if config_path else default_config_path()
    try:
        write_default_config(path)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read or create the config file: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file: {exc}") from None
    parsed = parse_config(text, path)

    models = builtin_models()
    models.update(parsed["entries"])
    inference = replace(InferenceDefaults(), **parsed["inference"])

    server_kw = dict(parsed["server"])
    env_key = os.environ.get(API_KEY_ENV)
    if env_key is not None:  # a secret injected by the environment beats the file; --api-key beats both
        try:
            server_kw["api_key"] = _api_key(env_key)
        except ValueError as exc:
            raise ConfigError(f"environment variable {API_KEY_ENV}: {exc}") from None

    cli_inference: dict[str, Any] = {}
    cli_ray: dict[str, Any] = {}
    flags = settings_table.by_dest()
    for dest, v in cli.items():
        setting = flags.get(dest) or SETTINGS.get(dest)  # a flag's dest, or a setting's name (other CLIs)
        if setting is None:
            continue
        target = {"inference": cli_inference, "ray": cli_ray, "server": server_kw}[setting.section]
        try:
            target[setting.name] = setting.check(v)
        except ValueError as exc:
            raise ConfigError(f"--{dest.replace('_', '-')}: {exc}") from None
    server = replace(ServerSettings(), **server_kw)

    active = cli.get("model") or parsed.get("active") or DEFAULT_ACTIVE
    if active not in models:
        source = "--model" if cli.get("model") else f"{path}: models.active"
        raise ConfigError(f"{source}: unknown model {active!r} (configured: {', '.join(models)})")

    paths = {field_: Path(cli[flag]).expanduser().resolve() for flag, field_ in _CLI_PATH_KEYS.items() if cli.get(flag)}
    if paths:
        models[active] = replace(models[active], **paths)

    cache_dir = cli.get("cache_dir") or parsed.get("cache_dir") or default_cache_dir()
    return Settings(
        config_path=path,
        cache_dir=Path(cache_dir).expanduser(),
        active=active,
        models=models,
        inference=inference,
        server=server,
        cli_inference=cli_inference,
        file_inference=dict(parsed["inference"]),
        cli_ray=cli_ray,
    )


def builtin_settings(config_path: Path | None = None, cache_dir: Path | None = None) -> Settings:
    """Settings with only built-in values (no file read); handy for tests and tools."""
    return Settings(
        config_path=config_path or default_config_path(),
        cache_dir=cache_dir or default_cache_dir(),
    )


__all__ = [
    "API_KEY_ENV",
    "DEFAULT_CONFIG_TOML",
    "ConfigError",
    "InferenceDefaults",
    "ModelEntry",
    "RAY_KEYS",
    "RayDeploymentSettings",
    "ServerSettings",
    "Settings",
    "builtin_models",
    "builtin_settings",
    "default_cache_dir",
    "default_config_path",
    "default_dtype",
    "load_settings",
    "parse_bool",
    "parse_config",
]
