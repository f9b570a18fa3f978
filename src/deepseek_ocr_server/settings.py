"""Every setting declared once: name, type, range or choices, default, help.

One :class:`Setting` row per key of the config file's ``[inference]`` / ``[server]`` / ``[models.entries.<id>.ray]``
tables. Everything else is derived from this table:

- the config file checks (``config.check_value``) and the dataclasses ``InferenceDefaults``,
  ``ServerSettings``, ``RayDeploymentSettings`` (their fields and defaults);
- the command-line flags (``cli.build_parser``: ``--base-size`` ... with the same check and the default in
  ``--help``);
- the request fields' bounds (``api.schemas.DecodeFields``: ``Field(ge=..., le=...)``) and
  ``SamplingParams`` (defaults and :meth:`Setting.check` in its ``validate``);
- the ``[inference]`` and ``[server]`` blocks of the default config file (``config.DEFAULT_CONFIG_TOML``).

A model family's own defaults (``max_new_tokens = 8192`` for GLM-OCR ...) are not here: they are part of
the family's spec (``models/<family>/spec.py``) and sit between these defaults and the config file.

Ranges, and why:

- ``base_size`` / ``image_size`` 64..4096: one image token covers 64x64 px in DeepSeek-OCR's views (a
  family checks its own finer rule, e.g. multiples of 64 or the two learned view sizes of DeepSeek-OCR 2);
  above 4096 px a global view is ~4k tokens, past what any of the decoders was trained on.
- ``max_new_tokens`` 1..32768: the KV cache is sized for the budget; 32768 covers the longest page any
  family writes (GLM-OCR's reference allows 8192) with room, while an absurd budget would size a huge cache.
- ``temperature`` 0..2 (the OpenAI range); ``top_p`` (0, 1]; ``repetition_penalty`` (0, 10];
  ``no_repeat_ngram_size`` 0..1024 (an n-gram longer than that never repeats in one answer).
- ``seed`` 0..2**63-1: what a TOML integer and a JSON client both carry exactly; ``torch.Generator`` takes it.
- ``pdf_dpi`` 36..600: below 36 dpi text is unreadable, above 600 a page is hundreds of megapixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DEVICES = ("cpu", "cuda", "metal")
DTYPES = ("f32", "f16", "bf16")
QUANTIZE = ("int8",)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind``: ``int``, ``float``, ``bool``, ``choice``, ``str``, ``str_list`` or ``api_key``.

    ``lo``/``hi``: inclusive bounds (``lo_open``: ``lo`` itself excluded); ``choices`` for ``choice``;
    ``none_word``: the text that means "unset" (None) in the file and on the command line (``auto``,
    ``none``); ``optional``: None is a valid value. ``flag``: the command-line flag (None: none; "" = the
    name with dashes). ``request``: the setting is also a request field (same name, same range).
    ``toml``: how the default config file shows it (``None``: the value, uncommented; ``"#"``: commented
    out, as unset or family-dependent); ``note``: its comment there."""

    name: str
    section: str  # "inference" | "server" | "ray"
    kind: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    none_word: str | None = None
    optional: bool = False
    flag: str | None = ""
    metavar: str | None = None
    group: str = ""
    request: bool = False
    toml: str | None = None
    note: str = ""
    #: an example value for a commented-out line (unset settings)
    example: Any = None

    @property
    def flag_name(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def metavar_text(self) -> str | None:
        """The flag's metavar: ``{cpu,cuda,metal}`` for a choice (its "unset" word last), else ``metavar``."""
        if self.kind == "choice":
            return "{" + ",".join((*self.choices, *((self.none_word,) if self.none_word else ()))) + "}"
        return self.metavar

    @property
    def dest(self) -> str | None:
        """The argparse dest of its flag (``--queue-timeout`` -> ``queue_timeout``)."""
        flag = self.flag_name
        return flag[2:].replace("-", "_") if flag else None

    def check(self, v: Any) -> Any:
        """The value, validated and normalised; ValueError saying what is wrong (never clamped)."""
        if v is None and (self.optional or self.none_word):
            return None
        k = self.kind
        if k == "int":
            if not _is_int(v):
                raise ValueError(f"expected an integer, got {_show(v)}")
            self._bounds(v)
            return v
        if k == "float":
            if not (_is_int(v) or isinstance(v, float)):
                raise ValueError(f"expected a number, got {_show(v)}")
            if not math.isfinite(float(v)):
                raise ValueError(f"must be a finite number, got {v}")
            self._bounds(float(v))
            return float(v)
        if k == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"expected true or false, got {_show(v)}")
            return v
        if k == "choice":
            if not isinstance(v, str):
                raise ValueError(f"expected a string, one of {', '.join(self.choices)}, got {_show(v)}")
            low = v.strip().lower()
            if self.none_word and low == self.none_word:
                return None
            if low not in self.choices:
                allowed = ", ".join((*self.choices, *((self.none_word,) if self.none_word else ())))
                raise ValueError(f"must be one of {allowed}, got {v!r}")
            return low
        if k == "str":
            if not isinstance(v, str):
                raise ValueError(f"expected a string, got {_show(v)}")
            if not v.strip():
                raise ValueError("must not be empty")
            return v
        if k == "str_list":
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise ValueError(f"expected a list of strings, got {_show(v)}")
            return list(v)
        if k == "api_key":
            # absent (no authentication) or a non-blank string: an empty value would silently turn
            # authentication off
            if not isinstance(v, str):
                raise ValueError(f"expected a string, got {_show(v)}")
            if not v.strip():
                raise ValueError("must not be empty (leave it out to run without authentication)")
            if v != v.strip():
                raise ValueError("must not start or end with whitespace")
            return v
        raise AssertionError(k)

    def _bounds(self, v: float) -> None:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            raise ValueError(f"must be {'>' if self.lo_open else '>='} {self.lo}, got {v}")
        if self.hi is not None and v > self.hi:
            raise ValueError(f"must be <= {self.hi}, got {v}")

    def field_bounds(self) -> dict[str, Any]:
        """The range as pydantic ``Field`` keywords (``ge``/``gt``/``le``)."""
        out: dict[str, Any] = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["le"] = self.hi
        if self.kind == "float":
            out["allow_inf_nan"] = False
        return out

    def range_text(self) -> str:
        """``64..4096``, ``(0, 1]``, ``>= 1``: for help texts."""
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"({_num(lo)}, {_num(hi)}]" if self.lo_open else f"{_num(lo)}..{_num(hi)}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(lo)}"
        return f"<= {_num(hi)}" if hi is not None else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


_I, _S, _R = "inference", "server", "ray"
_DEV, _VIS, _DEC, _HTTP = (
    "device and precision",
    "vision",
    "decoding (server defaults; a request body overrides them)",
    "HTTP server",
)

SETTINGS_TABLE: tuple[Setting, ...] = (
    # ---------------------------------------------------------------------------------- inference
    Setting(
        "device",
        _I,
        "choice",
        "cpu",
        "inference backend: cpu, cuda, or metal (Apple GPU via torch mps)",
        choices=DEVICES,
        group=_DEV,
        note="cpu | cuda | metal",
    ),
    Setting(
        "dtype",
        _I,
        "choice",
        None,
        "weights/activations precision",
        choices=DTYPES,
        none_word="auto",
        group=_DEV,
        note="auto | f32 | f16 | bf16 (auto: cpu per phase by CPU class, cuda bf16, metal f16)",
    ),
    Setting(
        "base_size",
        _I,
        "int",
        1024,
        "global view resolution",
        lo=64,
        hi=4096,
        metavar="N",
        group=_VIS,
        request=True,
        note="global view resolution",
    ),
    Setting(
        "image_size",
        _I,
        "int",
        640,
        "local tile resolution in dynamic crop mode",
        lo=64,
        hi=4096,
        metavar="N",
        group=_VIS,
        request=True,
        note="tile resolution in crop mode",
    ),
    Setting(
        "crop_mode",
        _I,
        "bool",
        True,
        "dynamic crop mode on/off",
        metavar="BOOL",
        group=_VIS,
        request=True,
        note="dynamic crop mode",
    ),
    Setting(
        "max_new_tokens",
        _I,
        "int",
        512,
        "default decoding budget; a request's max_tokens overrides it",
        lo=1,
        hi=32768,
        metavar="N",
        group=_DEC,
        note="a request's max_tokens overrides it",
    ),
    Setting(
        "do_sample",
        _I,
        "bool",
        False,
        "sample instead of greedy decoding by default",
        metavar="BOOL",
        group=_DEC,
        request=True,
    ),
    Setting(
        "temperature",
        _I,
        "float",
        0.0,
        "sampling temperature; only used with --do-sample true and > 0",
        lo=0.0,
        hi=2.0,
        metavar="T",
        group=_DEC,
        request=True,
    ),
    Setting(
        "top_p",
        _I,
        "float",
        1.0,
        "nucleus probability mass in (0, 1], sampling only",
        lo=0.0,
        hi=1.0,
        lo_open=True,
        metavar="P",
        group=_DEC,
        request=True,
    ),
    Setting(
        "top_k",
        _I,
        "int",
        None,
        "top-k cut, sampling only; 'none' disables",
        lo=1,
        optional=True,
        none_word="none",
        metavar="K",
        group=_DEC,
        request=True,
        toml="#",
        example=50,
        note="unset: no top-k cut",
    ),
    Setting(
        "repetition_penalty",
        _I,
        "float",
        1.0,
        "> 1 discourages repeats",
        lo=0.0,
        hi=10.0,
        lo_open=True,
        metavar="R",
        group=_DEC,
        request=True,
    ),
    Setting(
        "no_repeat_ngram_size",
        _I,
        "int",
        20,
        "global no-repeat n-gram size; 0 disables",
        lo=0,
        hi=1024,
        metavar="N",
        group=_DEC,
        request=True,
        note="0 disables",
    ),
    Setting(
        "seed",
        _I,
        "int",
        None,
        "sampling RNG seed, for reproducible sampling",
        lo=0,
        hi=2**63 - 1,
        optional=True,
        none_word="none",
        metavar="N",
        group=_DEC,
        request=True,
        toml="#",
        example=0,
        note="unset: random",
    ),
    Setting(
        "quantize",
        _I,
        "choice",
        None,
        "int8 weight-only quantisation of the linear layers: less memory, see README",
        choices=QUANTIZE,
        none_word="none",
        group=_DEV,
        note="none | int8 (weight-only int8 linear layers)",
    ),
    # ------------------------------------------------------------------------------------- server
    Setting("host", _S, "str", "0.0.0.0", "bind address", metavar="ADDR", group=_HTTP),
    Setting("port", _S, "int", 8000, "HTTP port", lo=1, hi=65535, metavar="PORT", group=_HTTP),
    Setting(
        "api_key",
        _S,
        "api_key",
        None,
        "require 'Authorization: Bearer KEY' on /v1/*; env DEEPSEEK_OCR_API_KEY, then [server] api_key",
        optional=True,
        metavar="KEY",
        group=_HTTP,
        toml="#",
        example="secret",
        note="env DEEPSEEK_OCR_API_KEY overrides it; unset: no authentication",
    ),
    Setting("cors_origins", _S, "str_list", ("*",), "origins allowed by CORS", flag=None),
    Setting(
        "allow_private_image_urls",
        _S,
        "bool",
        False,
        "let image URLs point at loopback/private/link-local addresses",
        metavar="BOOL",
        group=_HTTP,
        note="let image URLs point at loopback/private addresses",
    ),
    Setting(
        "max_body_bytes",
        _S,
        "int",
        32 * MiB,
        "request body cap (413 above)",
        lo=1024,
        flag=None,
        note="32 MiB request body (413 above)",
    ),
    Setting("max_images_per_request", _S, "int", 8, "images per request", lo=1, flag=None),
    Setting(
        "max_image_pixels",
        _S,
        "int",
        64_000_000,
        "decoded pixels per image",
        lo=1,
        flag=None,
        note="decoded pixels per image (decompression-bomb guard)",
    ),
    Setting(
        "image_fetch_timeout_s",
        _S,
        "float",
        10.0,
        "whole download of one image URL",
        lo=0.0,
        lo_open=True,
        flag=None,
        note="whole download of one image URL",
    ),
    Setting(
        "image_fetch_max_bytes",
        _S,
        "int",
        20 * MiB,
        "largest encoded image",
        lo=1,
        flag=None,
        note="20 MiB: largest encoded image (data: URL or download)",
    ),
    Setting(
        "max_running",
        _S,
        "int",
        8,
        "sequences generated concurrently (batched decode)",
        lo=1,
        metavar="N",
        group=_HTTP,
        note="sequences decoded together",
    ),
    Setting(
        "max_queued",
        _S,
        "int",
        32,
        "requests waiting for a slot before new ones get 429",
        lo=0,
        metavar="N",
        group=_HTTP,
        note="waiting requests before 429",
    ),
    Setting(
        "queue_timeout_s",
        _S,
        "float",
        300.0,
        "longest wait in the queue before a 503",
        lo=0.0,
        lo_open=True,
        flag="--queue-timeout",
        metavar="SECONDS",
        group=_HTTP,
        note="longest wait for a slot (503 after)",
    ),
    Setting(
        "prefill_slice_s",
        _S,
        "float",
        0.25,
        "during a prefill, running streams get a decode step at least this often "
        "(0: at every layer; large: none until the prefill ends)",
        lo=0.0,
        flag="--prefill-slice",
        metavar="SECONDS",
        group=_HTTP,
        note="running streams get a decode step at least this often during a prefill",
    ),
    Setting(
        "max_prompt_chars",
        _S,
        "int",
        32768,
        "characters of text per request",
        lo=1,
        hi=10_000_000,
        flag=None,
        note="characters of text per request (system + user + partial answer); 400 above",
    ),
    Setting(
        "max_pixels_in_flight",
        _S,
        "int",
        256_000_000,
        "decoded image pixels held by all requests",
        lo=1,
        flag=None,
        note="decoded image pixels held by all requests before preprocessing (429 above)",
    ),
    Setting(
        "shutdown_drain_s",
        _S,
        "float",
        30.0,
        "on SIGTERM/Ctrl-C, running requests get this long to finish before they end with an error",
        lo=0.0,
        flag="--shutdown-drain",
        metavar="SECONDS",
        group=_HTTP,
        note="on SIGTERM/Ctrl-C: running requests get this long to finish, then an error",
    ),
    Setting(
        "header_timeout_s",
        _S,
        "float",
        10.0,
        "request headers deadline",
        lo=0.0,
        lo_open=True,
        flag=None,
        note="a connection that has not sent its request headers by then is closed",
    ),
    Setting(
        "body_timeout_s",
        _S,
        "float",
        60.0,
        "request body deadline",
        lo=0.0,
        lo_open=True,
        flag=None,
        note="a request body not received by then gets 408",
    ),
    Setting(
        "max_connections",
        _S,
        "int",
        1000,
        "open connections",
        lo=1,
        flag=None,
        note="open connections; more are closed at once",
    ),
    Setting(
        "pdf_dpi",
        _S,
        "int",
        144,
        "PDF render resolution",
        lo=36,
        hi=600,
        flag=None,
        note='PDF pages are rendered at this resolution (a request\'s "dpi" overrides)',
    ),
    Setting(
        "max_pages",
        _S,
        "int",
        100,
        "pages per document request",
        lo=1,
        hi=10_000,
        flag=None,
        note='pages per document request (more: 400, select fewer with "pages")',
    ),
    # -------------------------------------------------------------------------- ray (per model)
    Setting(
        "min_replicas",
        _R,
        "int",
        1,
        "replicas per model kept up, for every model",
        lo=0,
        hi=10_000,
        flag="--ray-min-replicas",
        metavar="N",
    ),
    Setting(
        "max_replicas",
        _R,
        "int",
        None,
        "autoscale each model up to N replicas on ongoing requests",
        lo=1,
        hi=10_000,
        optional=True,
        none_word="none",
        flag="--ray-max-replicas",
        metavar="N",
    ),
    Setting(
        "num_cpus",
        _R,
        "float",
        1.0,
        "CPUs (torch threads) per model replica",
        lo=0.0,
        flag="--ray-num-cpus",
        metavar="X",
    ),
    Setting(
        "num_gpus",
        _R,
        "float",
        0.0,
        "GPUs per model replica, fractions allowed",
        lo=0.0,
        flag="--ray-num-gpus",
        metavar="X",
    ),
    Setting(
        "target_ongoing_requests",
        _R,
        "float",
        None,
        "autoscaling target of ongoing requests per replica",
        lo=0.0,
        lo_open=True,
        optional=True,
        none_word="none",
        flag="--ray-target-ongoing-requests",
        metavar="X",
    ),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in SETTINGS_TABLE}
assert len(SETTINGS) == len(SETTINGS_TABLE), "a setting is declared twice"


def section(name: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS_TABLE if s.section == name)


def default(name: str) -> Any:
    d = SETTINGS[name].default
    return list(d) if isinstance(d, tuple) else d


def dataclass_fields(section_name: str) -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` triples for ``dataclasses.make_dataclass``: one field per setting of the
    section, with its default."""
    types = {
        "int": int,
        "float": float,
        "bool": bool,
        "choice": str,
        "str": str,
        "api_key": str,
        "str_list": list,
    }
    out: list[tuple[str, Any, Any]] = []
    for s in section(section_name):
        t: Any = types[s.kind]
        if s.default is None:
            t = t | None
        if isinstance(s.default, tuple):
            out.append((s.name, t, field(default_factory=lambda d=s.default: list(d))))
        else:
            out.append((s.name, t, field(default=s.default)))
    return out


def by_dest() -> dict[str, Setting]:
    """Settings with a flag, by argparse dest."""
    return {s.dest: s for s in SETTINGS_TABLE if s.dest}


def check(name: str, value: Any) -> Any:
    """Validate (and normalise) one value of the table. Raises ValueError with the problem."""
    return SETTINGS[name].check(value)


__all__ = [
    "DEVICES",
    "DTYPES",
    "QUANTIZE",
    "SETTINGS",
    "SETTINGS_TABLE",
    "Setting",
    "by_dest",
    "check",
    "default",
    "section",
]
