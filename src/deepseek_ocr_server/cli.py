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
from .config import (
    DEFAULT_DTYPE_BY_DEVICE,
    DEVICES,
    DTYPES,
    ConfigError,
    InferenceDefaults,
    RayDeploymentSettings,
    ServerSettings,
    Settings,
    check_value,
    default_cache_dir,
    default_config_path,
    load_settings,
    parse_bool,
)

PROG = "deepseek-ocr-server"
_INF = InferenceDefaults()
_SRV = ServerSettings()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse ``type=``: convert the text, then apply the same check the config file gets."""

    def parse(text: str) -> Any:
        try:
            return check_value(key, convert(text))
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


def build_parser() -> argparse.ArgumentParser:
    dtype_defaults = ", ".join(f"{d} -> {t}" for d, t in DEFAULT_DTYPE_BY_DEVICE.items())
    p = _Parser(
        prog=PROG,
        description=(
            "OpenAI-compatible OCR server for DeepSeek-OCR and PaddleOCR-VL. "
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
    g.add_argument("--model", metavar="ID", type=_str,
                   help="model entry to preload: deepseek-ocr, paddleocr-vl, glm-ocr or a custom [models.entries.<id>] "
                        "(default: [models].active, else deepseek-ocr)")
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

    g = p.add_argument_group("device and precision")
    g.add_argument("--device", metavar="{" + ",".join(DEVICES) + "}", type=_typed("device", _str),
                   help=f"inference backend: cpu, cuda, or metal (Apple GPU via torch mps) (default: {_INF.device})")
    g.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + ",auto}", type=_typed("dtype", _str),
                   help=f"weights/activations precision (default: auto = by device: {dtype_defaults})")
    g.add_argument("--quantize", metavar="{none,int8}", type=_typed("quantize", _str),
                   help="int8 weight-only quantisation of the linear layers: less memory, see README (default: none)")

    g = p.add_argument_group("vision")
    g.add_argument("--base-size", metavar="N", type=_typed("base_size", int),
                   help=f"global view resolution (default: {_INF.base_size})")
    g.add_argument("--image-size", metavar="N", type=_typed("image_size", int),
                   help=f"local tile resolution in dynamic crop mode, DeepSeek-OCR only (default: {_INF.image_size}; "
                        "768 for deepseek-ocr-2)")
    g.add_argument("--crop-mode", metavar="BOOL", type=_typed("crop_mode", parse_bool),
                   help="dynamic crop mode on/off, DeepSeek-OCR only; PaddleOCR-VL ignores it "
                        f"(default: {_show(_INF.crop_mode)})")

    g = p.add_argument_group("decoding (server defaults; a request body overrides them)")
    g.add_argument("--max-new-tokens", metavar="N", type=_typed("max_new_tokens", int),
                   help=f"default decoding budget; a request's max_tokens overrides it (default: {_INF.max_new_tokens}; "
                        "glm-ocr: 8192)")
    g.add_argument("--do-sample", metavar="BOOL", type=_typed("do_sample", parse_bool),
                   help=f"sample instead of greedy decoding by default (default: {_show(_INF.do_sample)})")
    g.add_argument("--temperature", metavar="T", type=_typed("temperature", float),
                   help=f"sampling temperature; only used with --do-sample true and > 0 (default: {_INF.temperature})")
    g.add_argument("--top-p", metavar="P", type=_typed("top_p", float),
                   help=f"nucleus probability mass in (0, 1], sampling only (default: {_INF.top_p})")
    g.add_argument("--top-k", metavar="K", type=_typed("top_k", _optional(int)),
                   help="top-k cut, sampling only; 'none' disables (default: none)")
    g.add_argument("--repetition-penalty", metavar="R", type=_typed("repetition_penalty", float),
                   help=f"> 1 discourages repeats (default: {_INF.repetition_penalty})")
    g.add_argument("--no-repeat-ngram-size", metavar="N", type=_typed("no_repeat_ngram_size", int),
                   help=f"global no-repeat n-gram size; 0 disables (default: {_INF.no_repeat_ngram_size}; "
                        "paddleocr-vl and glm-ocr: 0, as their references decode)")
    g.add_argument("--seed", metavar="N", type=_typed("seed", _optional(int)),
                   help="sampling RNG seed, for reproducible sampling (default: none)")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", metavar="ADDR", type=_typed("host", _str),
                   help=f"bind address (default: {_SRV.host})")
    g.add_argument("--port", metavar="PORT", type=_typed("port", int),
                   help=f"HTTP port (default: {_SRV.port})")
    g.add_argument("--api-key", metavar="KEY", type=_typed("api_key", _str),  # "" is refused, not "no auth"
                   help="require 'Authorization: Bearer KEY' on /v1/*; env DEEPSEEK_OCR_API_KEY, then [server] api_key "
                        "(default: none, no authentication)")
    g.add_argument("--allow-private-image-urls", metavar="BOOL",
                   type=_typed("allow_private_image_urls", parse_bool),
                   help="let image URLs point at loopback/private/link-local addresses "
                        f"(default: {_show(_SRV.allow_private_image_urls)})")
    g.add_argument("--max-running", metavar="N", type=_typed("max_running", int),
                   help=f"sequences generated concurrently (batched decode) (default: {_SRV.max_running})")
    g.add_argument("--max-queued", metavar="N", type=_typed("max_queued", int),
                   help=f"requests waiting for a slot before new ones get 429 (default: {_SRV.max_queued})")
    g.add_argument("--queue-timeout", metavar="SECONDS", type=_typed("queue_timeout_s", float),
                   help=f"longest wait in the queue before a 503 (default: {_SRV.queue_timeout_s:g})")
    g.add_argument("--prefill-slice", metavar="SECONDS", type=_typed("prefill_slice_s", float),
                   help="during a prefill, running streams get a decode step at least this often "
                        f"(0: at every layer; large: none until the prefill ends) (default: {_SRV.prefill_slice_s:g})")

    g.add_argument("--shutdown-drain", metavar="SECONDS", type=_typed("shutdown_drain_s", float),
                   help="on SIGTERM/Ctrl-C, running requests get this long to finish before they end with an "
                        f"error (default: {_SRV.shutdown_drain_s:g})")
    g = p.add_argument_group("cluster mode (Ray Serve; needs the [ray] extra)")
    g.add_argument("--ray", metavar="ADDRESS", nargs="?", const="", type=_str,
                   help="serve on Ray Serve: one deployment per configured model, replicas spread over the cluster; "
                        "ADDRESS of a running cluster (auto, HOST:PORT, ray://HOST:10001), or none to use "
                        "RAY_ADDRESS or start a local one (default: off, single process)")
    _RAY = RayDeploymentSettings()
    g.add_argument("--ray-min-replicas", metavar="N", type=_typed("min_replicas", int),
                   help=f"replicas per model kept up, for every model (default: {_RAY.min_replicas}; "
                        "per model: [models.entries.<id>.ray])")
    g.add_argument("--ray-max-replicas", metavar="N", type=_typed("max_replicas", _optional(int)),
                   help="autoscale each model up to N replicas on ongoing requests (default: none = min-replicas)")
    g.add_argument("--ray-num-cpus", metavar="X", type=_typed("num_cpus", float),
                   help=f"CPUs (torch threads) per model replica (default: {_RAY.num_cpus:g})")
    g.add_argument("--ray-num-gpus", metavar="X", type=_typed("num_gpus", float),
                   help=f"GPUs per model replica, fractions allowed (default: {_RAY.num_gpus:g})")
    g.add_argument("--ray-target-ongoing-requests", metavar="X",
                   type=_typed("target_ongoing_requests", _optional(float)),
                   help="autoscaling target of ongoing requests per replica (default: none = --max-running)")

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
