"""Settings: built-in defaults <- config.toml <- command-line flags, resolved in exactly ONE place.

Layers, lowest first:

1. built-in defaults (the dataclass defaults below, ``BUILTIN_MODELS``);
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
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "deepseek-ocr"
API_KEY_ENV = "DEEPSEEK_OCR_API_KEY"

DEVICES = ("cpu", "cuda", "metal")
DTYPES = ("f32", "f16", "bf16")
QUANTIZE = ("int8",)
#: dtype used when none is configured; see :func:`default_dtype`. ``auto`` on CPU: each phase in the
#: precision the processor runs fast (``models/precision.py``: bf16 with native bf16, else f32 compute
#: over bf16-stored weights).
DEFAULT_DTYPE_BY_DEVICE = {"cpu": "auto", "cuda": "bf16", "metal": "f16"}


def model_kinds() -> tuple[str, ...]:
    """Kinds in the model registry (``models.MODEL_KINDS``), imported lazily."""
    from .models import MODEL_KINDS

    return tuple(MODEL_KINDS)

#: Task prompt used when a request brings an image but no text, per model kind.
DEFAULT_PROMPTS = {
    "deepseek-ocr": "<image>\n<|grounding|>Convert the document to markdown.",
    "deepseek-ocr-2": "<image>\n<|grounding|>Convert the document to markdown.",
    "paddleocr-vl": "OCR:",
    "glm-ocr": "Text Recognition:",
}


class ConfigError(Exception):
    """A bad config file or flag value. The message names the file (or flag), the key and the problem."""


# --------------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceDefaults:
    """Server-side defaults of one model's inference. ``dtype=None`` means "the device's default"
    (:func:`default_dtype`); :meth:`Settings.inference_for` always returns it resolved."""

    device: str = "cpu"
    dtype: str | None = None
    base_size: int = 1024
    image_size: int = 640
    crop_mode: bool = True
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 20
    seed: int | None = None
    quantize: str | None = None  # None or "int8"

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

    def vision(self) -> Any:
        """These defaults as :class:`~deepseek_ocr_server.models.base.VisionSettings`."""
        from .models.base import VisionSettings

        return VisionSettings(base_size=self.base_size, image_size=self.image_size, crop_mode=self.crop_mode)


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


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    allow_private_image_urls: bool = False
    max_body_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 8
    max_image_pixels: int = 64_000_000
    image_fetch_timeout_s: float = 10.0
    image_fetch_max_bytes: int = 20 * 1024 * 1024
    max_running: int = 8
    max_queued: int = 32
    queue_timeout_s: float = 300.0
    prefill_slice_s: float = 0.25
    max_prompt_chars: int = 32768
    max_pixels_in_flight: int = 256_000_000
    shutdown_drain_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000
    pdf_dpi: int = 144
    max_pages: int = 100


SERVER_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ServerSettings))

#: the resolutions a PDF page may be rendered at (config ``pdf_dpi`` and a request's ``dpi``)
PDF_DPI_RANGE = (36, 600)


@dataclass(frozen=True)
class RayDeploymentSettings:
    """One model's Ray Serve deployment (cluster mode only): ``[models.entries.<id>.ray]``, the
    ``--ray-*`` flags over it. ``max_replicas`` None means ``min_replicas`` (a fixed replica count, no
    autoscaling); above it, Serve autoscales on ongoing requests per replica
    (``target_ongoing_requests``, None: the replica's ``max_running``). ``min_replicas = 0`` scales from
    zero (up to ``max_replicas``, at least 1). ``num_cpus`` is also the replica's torch thread count."""

    min_replicas: int = 1
    max_replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    target_ongoing_requests: float | None = None


RAY_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RayDeploymentSettings))

#: Built-in defaults that differ by model kind (the lowest layer: ``[inference]`` and everything above
#: still override them). PaddleOCR-VL's reference decodes plain greedy with no n-gram ban (SPEC §9): a
#: 20-gram ban would break long legitimate repeats (``<ecel>`` runs in tables, dot leaders).
#: DeepSeek-OCR 2 cuts 768-px tiles (its encoder has learned queries for 768- and 1024-px views only).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "paddleocr-vl": {"no_repeat_ngram_size": 0},
    "deepseek-ocr-2": {"image_size": 768},
    # GLM-OCR's reference: greedy, no n-gram ban, up to 8192 new tokens (a dense page runs long)
    "glm-ocr": {"no_repeat_ngram_size": 0, "max_new_tokens": 8192},
}

BUILTIN_MODELS: dict[str, ModelEntry] = {
    "deepseek-ocr": ModelEntry(id="deepseek-ocr", kind="deepseek-ocr", repo="deepseek-ai/DeepSeek-OCR"),
    "deepseek-ocr-2": ModelEntry(
        id="deepseek-ocr-2", kind="deepseek-ocr-2", repo="deepseek-ai/DeepSeek-OCR-2"
    ),
    "paddleocr-vl": ModelEntry(id="paddleocr-vl", kind="paddleocr-vl", repo="PaddlePaddle/PaddleOCR-VL"),
    "glm-ocr": ModelEntry(id="glm-ocr", kind="glm-ocr", repo="zai-org/GLM-OCR"),
}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs, after merging all layers.

    ``inference`` is the ``[inference]`` layer over the built-ins; ``cli_inference`` holds the
    inference flags the user passed. Use :meth:`inference_for` for a model's effective values.
    """

    config_path: Path
    cache_dir: Path
    active: str = "deepseek-ocr"
    models: dict[str, ModelEntry] = field(default_factory=lambda: dict(BUILTIN_MODELS))
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
        merged = replace(self.inference, **KIND_DEFAULTS.get(entry.kind, {}))
        merged = replace(merged, **self.file_inference)
        merged = replace(merged, **entry.overrides)
        merged = replace(merged, **self.cli_inference)
        return replace(merged, dtype=merged.effective_dtype)

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
        return e.prompt if e.prompt is not None else DEFAULT_PROMPTS.get(e.kind, "")

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
    """Validate (and normalise) one inference/server value. Raises ValueError with the problem."""
    spec = _SPECS[key]
    return spec(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False):
    def check(v: Any) -> int | None:
        if v is None and optional:
            return None
        if not _is_int(v):
            raise ValueError(f"expected an integer, got {_show(v)}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}, got {v}")
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, optional: bool = False):
    def check(v: Any) -> float | None:
        if v is None and optional:
            return None
        if not (_is_int(v) or isinstance(v, float)):
            raise ValueError(f"expected a number, got {_show(v)}")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"must be a finite number, got {v}")
        if lo is not None and (f <= lo if lo_open else f < lo):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and f > hi:
            raise ValueError(f"must be <= {hi}, got {v}")
        return f

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_show(v)}")
    return v


def _choice(options: tuple[str, ...], none_words: tuple[str, ...] = ()):
    def check(v: Any) -> str | None:
        if v is None and none_words:
            return None
        if not isinstance(v, str):
            raise ValueError(f"expected a string, one of {', '.join(options)}, got {_show(v)}")
        low = v.strip().lower()
        if low in none_words:
            return None
        if low not in options:
            allowed = ", ".join((*options, *none_words[:1]))
            raise ValueError(f"must be one of {allowed}, got {v!r}")
        return low

    return check


def _str(optional: bool = False, nonempty: bool = True):
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {_show(v)}")
        if optional and v == "":
            return None
        if nonempty and not v.strip():
            raise ValueError("must not be empty")
        return v

    return check


def _api_key(v: Any) -> str | None:
    """An API key is absent (no authentication) or a non-blank string: an empty value would silently
    turn authentication off."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_show(v)}")
    if not v.strip():
        raise ValueError("must not be empty (leave it out to run without authentication)")
    if v != v.strip():
        raise ValueError("must not start or end with whitespace")
    return v


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"expected a list of strings, got {_show(v)}")
    return list(v)


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


_SPECS: dict[str, Any] = {
    # inference
    "device": _choice(DEVICES),
    "dtype": _choice(DTYPES, none_words=("auto",)),
    "base_size": _int(16, 8192),
    "image_size": _int(16, 8192),
    "crop_mode": _bool,
    "max_new_tokens": _int(1, 1_000_000),
    "do_sample": _bool,
    "temperature": _float(0.0),
    "top_p": _float(0.0, 1.0, lo_open=True),
    "top_k": _int(1, optional=True),
    "repetition_penalty": _float(0.0, lo_open=True),
    "no_repeat_ngram_size": _int(0),
    "seed": _int(0, 2**63 - 1, optional=True),
    "quantize": _choice(QUANTIZE, none_words=("none",)),
    # server
    "host": _str(),
    "port": _int(1, 65535),
    "api_key": _api_key,
    "cors_origins": _str_list,
    "allow_private_image_urls": _bool,
    "max_body_bytes": _int(1024),
    "max_images_per_request": _int(1),
    "max_image_pixels": _int(1),
    "image_fetch_timeout_s": _float(0.0, lo_open=True),
    "image_fetch_max_bytes": _int(1),
    "max_running": _int(1),
    "max_queued": _int(0),
    "queue_timeout_s": _float(0.0, lo_open=True),
    "prefill_slice_s": _float(0.0),
    "max_prompt_chars": _int(1, 10_000_000),
    "max_pixels_in_flight": _int(1),
    "shutdown_drain_s": _float(0.0),
    "header_timeout_s": _float(0.0, lo_open=True),
    "body_timeout_s": _float(0.0, lo_open=True),
    "max_connections": _int(1),
    "pdf_dpi": _int(*PDF_DPI_RANGE),
    "max_pages": _int(1, 10_000),
    # ray (cluster mode, per model)
    "min_replicas": _int(0, 10_000),
    "max_replicas": _int(1, 10_000, optional=True),
    "num_cpus": _float(0.0),
    "num_gpus": _float(0.0),
    "target_ongoing_requests": _float(0.0, lo_open=True, optional=True),
}
assert set(_SPECS) == set(INFERENCE_KEYS) | set(SERVER_KEYS) | set(RAY_KEYS)

# --------------------------------------------------------------------------------------------------
# the default file
# --------------------------------------------------------------------------------------------------
DEFAULT_CONFIG_TOML = """\
# deepseek-ocr-server configuration.
# Precedence: command-line flag > this file (a model entry's values over [inference]) > built-in default.
# A request body (max_tokens, temperature, ...) overrides for that request only.
# Keys left out (or commented out) take the built-in default shown here.

[models]
# Model preloaded at start (--model overrides). Requests pick any entry by its id ("model" field).
active = "deepseek-ocr"
# Where downloaded models live: <cache_dir>/models/<id>/ (default: the platform cache dir).
# cache_dir = "/srv/deepseek-ocr-cache"

[models.entries.deepseek-ocr]
kind = "deepseek-ocr"
repo = "deepseek-ai/DeepSeek-OCR"
revision = "main"
# Optional explicit files (else: <cache_dir>/models/deepseek-ocr/, else download from the repo):
# config = "/path/to/config.json"
# tokenizer = "/path/to/tokenizer.json"
# weights = "/path/to/model.safetensors"
# Default task prompt when a request has an image but no text:
# prompt = "<image>\\n<|grounding|>Convert the document to markdown."
# Per-model inference defaults (any key of [inference]) go here, e.g.:
# base_size = 1024
# image_size = 640
# crop_mode = true

[models.entries.deepseek-ocr-2]
kind = "deepseek-ocr-2"
repo = "deepseek-ai/DeepSeek-OCR-2"
revision = "main"
# prompt = "<image>\\n<|grounding|>Convert the document to markdown."
# base_size = 1024          # 1024 or 768 (the encoder's two view sizes)
# image_size = 768          # 768 or 1024

[models.entries.paddleocr-vl]
kind = "paddleocr-vl"
repo = "PaddlePaddle/PaddleOCR-VL"
revision = "main"
# prompt = "OCR:"

[models.entries.glm-ocr]
kind = "glm-ocr"
repo = "zai-org/GLM-OCR"
revision = "main"
# prompt = "Text Recognition:"   # or "Formula Recognition:", "Table Recognition:"

# A custom entry (a fine-tune of a supported kind) looks like this:
# [models.entries.my-finetune]
# kind = "deepseek-ocr"
# repo = "me/my-deepseek-ocr-finetune"
# weights = "/data/my-finetune/model.safetensors"

[inference]
device = "cpu"              # cpu | cuda | metal
dtype = "auto"              # auto | f32 | f16 | bf16 (auto: cpu per phase by CPU class, cuda bf16, metal f16)
base_size = 1024            # global view resolution
# image_size = 640          # unset: 640 for deepseek-ocr, 768 for deepseek-ocr-2 (local tile resolution in crop mode)
crop_mode = true            # dynamic crop mode (DeepSeek-OCR only)
# max_new_tokens = 512      # unset: 512, 8192 for glm-ocr; a request's max_tokens overrides it
do_sample = false
temperature = 0.0
top_p = 1.0
# top_k = 50                # unset: no top-k cut
repetition_penalty = 1.0
# no_repeat_ngram_size = 20 # unset: 20 for deepseek-ocr, 0 for paddleocr-vl and glm-ocr; 0 disables
# seed = 0                  # unset: random
quantize = "none"           # none | int8 (weight-only int8 linear layers)

[server]
host = "0.0.0.0"
port = 8000
# api_key = "secret"        # env DEEPSEEK_OCR_API_KEY overrides it; unset: no authentication
cors_origins = ["*"]
allow_private_image_urls = false   # let image URLs point at loopback/private addresses
max_body_bytes = 33554432          # 32 MiB request body (413 above)
max_images_per_request = 8
max_image_pixels = 64000000        # decoded pixels per image (decompression-bomb guard)
image_fetch_timeout_s = 10.0       # whole download of one image URL
image_fetch_max_bytes = 20971520   # 20 MiB: largest encoded image (data: URL or download)
max_running = 8                    # sequences decoded together
max_queued = 32                    # waiting requests before 429
queue_timeout_s = 300.0            # longest wait for a slot (503 after)
prefill_slice_s = 0.25             # running streams get a decode step at least this often during a prefill
max_prompt_chars = 32768           # characters of text per request (system + user + partial answer); 400 above
max_pixels_in_flight = 256000000   # decoded image pixels held by all requests before preprocessing (429 above)
shutdown_drain_s = 30.0            # on SIGTERM/Ctrl-C: running requests get this long to finish, then an error
header_timeout_s = 10.0            # a connection that has not sent its request headers by then is closed
body_timeout_s = 60.0              # a request body not received by then gets 408
max_connections = 1000             # open connections; more are closed at once
pdf_dpi = 144                      # PDF pages are rendered at this resolution (a request's "dpi" overrides)
max_pages = 100                    # pages per document request (more: 400, select fewer with "pages")
"""


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
_CLI_SERVER_RENAMES = {"queue_timeout": "queue_timeout_s", "prefill_slice": "prefill_slice_s",
                       "shutdown_drain": "shutdown_drain_s"}
#: ``--ray-min-replicas`` etc. (argparse dest ``ray_min_replicas``) -> :class:`RayDeploymentSettings` key
_CLI_RAY_PREFIX = "ray_"


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
        base = BUILTIN_MODELS.get(mid)
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

    models = dict(BUILTIN_MODELS)
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
    for key, v in cli.items():
        name = _CLI_SERVER_RENAMES.get(key, key)
        if name.startswith(_CLI_RAY_PREFIX) and name.removeprefix(_CLI_RAY_PREFIX) in RAY_KEYS:
            cli_ray[name.removeprefix(_CLI_RAY_PREFIX)] = _check_flag(name, v)
        elif name in INFERENCE_KEYS:
            cli_inference[name] = _check_flag(name, v)
        elif name in SERVER_KEYS:
            server_kw[name] = _check_flag(name, v)
    server = replace(ServerSettings(), **server_kw)

    active = cli.get("model") or parsed.get("active") or "deepseek-ocr"
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


def _check_flag(key: str, value: Any) -> Any:
    try:
        return check_value(key.removeprefix(_CLI_RAY_PREFIX) if key.startswith(_CLI_RAY_PREFIX) else key, value)
    except ValueError as exc:
        raise ConfigError(f"--{key.replace('_', '-')}: {exc}") from None


__all__ = [
    "API_KEY_ENV",
    "BUILTIN_MODELS",
    "DEFAULT_CONFIG_TOML",
    "DEFAULT_PROMPTS",
    "DEVICES",
    "DTYPES",
    "ConfigError",
    "InferenceDefaults",
    "ModelEntry",
    "RAY_KEYS",
    "RayDeploymentSettings",
    "ServerSettings",
    "Settings",
    "default_cache_dir",
    "default_config_path",
    "default_dtype",
    "load_settings",
    "parse_bool",
    "parse_config",
]
