"""The ``deepseek-ocr-server`` command.

Every flag defaults to "not given" (``argparse.SUPPRESS``) so that only the flags the user actually
typed override the config file; the defaults shown in ``--help`` are the built-in ones from
:mod:`.config`. Bad values exit with status 2 and a one-line message naming the flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from . import settings as table
from .config import (
    DEFAULT_ACTIVE,
    DEFAULT_DTYPE_BY_DEVICE,
    ConfigError,
    Settings,
    default_cache_dir,
    default_config_path,
    load_settings,
    parse_bool,
)
from .models import registry

PROG = "deepseek-ocr-server"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse ``type=``: convert the text, then apply the same check the config file gets."""

    def parse(text: str) -> Any:
        try:
            return table.check(key, convert(text))
        except ValueError as exc:
            msg = str(exc)
            if msg.startswith(("invalid literal", "could not convert")):
                kind = "a number" if "float" in msg else "an integer"
                msg = f"expected {kind}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    parse.__name__ = key
    return parse


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _str(text: str) -> str:
    return text


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


_CONVERT: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "bool": parse_bool, "choice": _str, "str": _str, "api_key": _str,
}
#: what "unset" means, for the help of settings whose default is None
_UNSET = {
    "dtype": "auto = by device: " + ", ".join(f"{d} -> {t}" for d, t in DEFAULT_DTYPE_BY_DEVICE.items()),
    "api_key": "none, no authentication",
    "max_replicas": "none = min-replicas",
    "target_ongoing_requests": "none = --max-running",
}


def _default_text(s: table.Setting) -> str:
    """``(default: 640; 768 for deepseek-ocr-2)``: the table's default and the families' own."""
    text = _UNSET.get(s.name) or _show(s.default)
    per = [f"{f.kind}: {_show(f.defaults[s.name])}" for f in registry.builtin_families() if s.name in f.defaults]
    return f"(default: {text}" + (f"; {', '.join(per)}" if per else "") + ")"


def _add_setting(g: Any, s: table.Setting) -> None:
    convert = _CONVERT[s.kind]
    if s.none_word and s.kind != "choice":  # "none" means unset ("" is refused for the API key)
        convert = _optional(convert)
    rng = s.range_text()
    help_ = s.help + (f"; {rng}" if rng and rng not in s.help else "")
    if s.request and s.group == "vision":  # a model family's option: say which families read it
        help_ += f"; read by {', '.join(registry.readers(s.name))} only"
    g.add_argument(s.flag_name, dest=s.dest, metavar=s.metavar_text, type=_typed(s.name, convert),
                   help=f"{help_} {_default_text(s)}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "OpenAI-compatible OCR server for " + ", ".join(f.title for f in registry.builtin_families()) + ". "
            "Precedence: flag > config.toml (per-model entry over [inference]) > built-in default; "
            "a request body overrides for one request."
        ),
        epilog=(
            f"Config file (created with defaults if missing): {default_config_path()}. "
            f"Model cache: {default_cache_dir()}/models/<id>/. "
            "Booleans take an explicit value: true/false, 1/0, yes/no. "
            "Downloads honour HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE."
        ),
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    g = p.add_argument_group("model and assets")
    builtin = ", ".join(f.kind for f in registry.builtin_families())
    g.add_argument("--model", metavar="ID", type=_str,
                   help=f"model entry to preload: {builtin} or a custom [models.entries.<id>] "
                        f"(default: [models].active, else {DEFAULT_ACTIVE})")
    g.add_argument("--config", metavar="PATH", type=_path,
                   help=f"config file to load, or to create with defaults if missing (default: {default_config_path()})")
    g.add_argument("--tokenizer", metavar="PATH", type=_path,
                   help="tokenizer.json to use for --model instead of the downloaded one (default: resolved per model)")
    g.add_argument("--weights", metavar="PATH", type=_path,
                   help="safetensors checkpoint (or *.safetensors.index.json) to use for --model instead of the "
                        "downloaded one (default: resolved per model)")
    g.add_argument("--model-config", metavar="PATH", type=_path,
                   help="the model's config.json override for --model (default: per model)")
    g.add_argument("--cache-dir", metavar="PATH", type=_path,
                   help=f"model cache root; files live in <cache-dir>/models/<id>/ (default: {default_cache_dir()})")

    groups: dict[str, Any] = {}
    for s in table.SETTINGS_TABLE:
        if s.flag_name and s.section != "ray":
            if s.group not in groups:
                groups[s.group] = p.add_argument_group(s.group)
            _add_setting(groups[s.group], s)

    g = p.add_argument_group("cluster mode (Ray Serve; needs the [ray] extra)")
    g.add_argument("--ray", metavar="ADDRESS", nargs="?", const="", type=_str,
                   help="serve on Ray Serve: one deployment per configured model, replicas spread over the cluster; "
                        "ADDRESS of a running cluster (auto, HOST:PORT, ray://HOST:10001), or none to use "
                        "RAY_ADDRESS or start a local one (default: off, single process)")
    for s in table.section("ray"):
        _add_setting(g, s)

    g = p.add_argument_group("misc")
    g.add_argument("--log-level", metavar="LEVEL", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: INFO)")
    g.add_argument("--log-format", metavar="{text,json}", type=str.lower, choices=["text", "json"],
                   help="text lines, or one JSON object per line for log collectors (default: text)")
    a("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Only the flags the user passed, keyed by argparse dest."""
    return vars(build_parser().parse_args(argv))


def check_device(device: str) -> str | None:
    """None if ``device`` is usable here, else the reason."""
    if device == "cpu":
        return None
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            built = getattr(torch.version, "cuda", None)
            why = "this torch build has no CUDA support" if not built else "no CUDA GPU is visible"
            return f"CUDA is not available ({why}; torch {torch.__version__}). Install a CUDA build of torch or use --device cpu"
        return None
    if device == "metal":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "Metal (torch mps) is not available: it needs an Apple-silicon Mac with a torch build that has MPS; use --device cpu"
        return None
    return f"unknown device {device!r}"


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse flags and build :class:`Settings`; exits 2 with one line on any user error."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    args.pop("log_level", None)
    args.pop("log_format", None)
    args.pop("ray", None)  # the mode, not a setting (see main)
    try:
        settings = load_settings(args, config_path)
    except ConfigError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    # Every configured model must be loadable on its device: fail now, not at the first request.
    for model_id in [settings.active, *settings.models]:
        dev = settings.inference_for(model_id).device
        reason = check_device(dev)
        if reason:
            source = "--device" if "device" in args else f"{settings.config_path}: device = {dev!r} ({model_id})"
            parser.exit(2, f"{PROG}: error: {source}: {reason}\n")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # exits on --help / --version / bad flags before anything heavy
    from .logs import setup_logging

    setup_logging(args.get("log_level", "INFO"), args.get("log_format", "text"))
    settings = settings_from_args(argv)
    if "ray" in args:  # cluster mode: imported only here, so the default path never imports ray
        from .rayserve.launch import run_ray

        return run_ray(settings, args["ray"] or None)
    from .server import run

    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
