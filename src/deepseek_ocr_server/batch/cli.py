"""The ``deepseek-ocr`` command: OCR files, folders, globs and PDFs into markdown, in one run.

It shares the server's settings machinery: the model, asset, device, precision, vision and decoding
flags are the server's own (taken from :func:`deepseek_ocr_server.cli.build_parser`, so both commands
always accept the same values with the same checks), resolved by :func:`~deepseek_ocr_server.config.
load_settings` with the same precedence (flag > config.toml, a model entry over ``[inference]`` >
built-in default) and the same asset resolution and download.

Exit status: 0 when every document succeeded (or was already done), 1 when some failed (listed at the
end) or nothing could run (the model does not load, the server is unreachable), 2 for bad usage,
130 after Ctrl-C (documents already written are complete; none is half-written).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .. import cli as server_cli
from ..config import PDF_DPI_RANGE, ConfigError, ServerSettings, load_settings
from . import pipeline
from .inputs import EXTENSIONS, UsageError, discover
from .outputs import FORMATS
from .progress import Progress
from .runner import BatchRun, RunOptions, Summary

PROG = "deepseek-ocr"

#: argument groups of the server's parser that apply to a batch run (by title; "decoding..." by prefix)
_SHARED_GROUPS = ("model and assets", "device and precision", "vision", "decoding")
#: single server flags (by dest) that apply too: the in-process engine's batch size
_SHARED_FLAGS = ("max_running",)
#: flags that only mean something when the model runs in this process
_LOCAL_ONLY = (
    "device",
    "dtype",
    "quantize",
    "weights",
    "tokenizer",
    "model_config",
    "cache_dir",
    "max_running",
)

_EPILOG = f"""\
outputs (per input document, under --output-dir, mirroring sub-folders of folder inputs):
  NAME.md          clean markdown, each page after a <!-- page N --> line
  NAME.json        the structured blocks of every page (the HTTP API's schema)
  NAME_images/     figure crops the markdown links to (only when there are figures)
  NAME_boxes/      with --boxes: page-0001.png, ... each page with its blocks drawn
  NAME.txt         with --format raw instead: the model's raw text (same page lines)

folders contribute files with these extensions (recursively): {" ".join(EXTENSIONS)}
An input whose outputs exist and are newer is skipped (--overwrite redoes it). A document that fails
is reported with its reason and the run goes on.

exit status: 0 all documents done, 1 some failed (listed at the end) or nothing could run,
2 bad usage, 130 interrupted (Ctrl-C; finished documents are complete, none is half-written).

config file: {server_cli.default_config_path()} (created with defaults if missing; --config PATH
uses another). Precedence: flag > config.toml (model entry over [inference]) > built-in default.

examples:
  deepseek-ocr scan.png                         # -> ./scan.md, ./scan.json
  deepseek-ocr report.pdf scans/ -o out/        # every page of the PDF and of every file in scans/
  deepseek-ocr 'inbox/**/*.pdf' --boxes         # a glob (quoted), with box visualisations
  cat page.jpg | deepseek-ocr - > page.md       # stdin -> stdout
  deepseek-ocr scans/ --server http://gpu-box:8000 --jobs 8   # send the pages to a running server
"""


def build_parser() -> argparse.ArgumentParser:
    p = server_cli._Parser(
        prog=PROG,
        usage=f"{PROG} INPUT... [-o OUTDIR] [options]",
        description=(
            "OCR images, multi-page TIFFs and PDFs (files, folders, globs, or - for stdin) into markdown "
            "and structured blocks, with the deepseek-ocr-server models, in this process or through a "
            "running server."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image, PDF or TIFF file, folder (recursive), glob pattern, or - (stdin -> stdout)",
    )
    g = p.add_argument_group("outputs")
    g.add_argument(
        "-o",
        "--output-dir",
        metavar="OUTDIR",
        type=Path,
        default=Path("."),
        help="where outputs go (default: the current folder)",
    )
    g.add_argument(
        "--format",
        choices=FORMATS,
        default="md",
        help="md: clean markdown + .json blocks + figure crops; raw: the model's raw text (.txt) "
        "(default: md)",
    )
    g.add_argument(
        "--boxes",
        action="store_true",
        help="also write each page with its blocks drawn (NAME_boxes/page-0001.png ...)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="redo inputs whose outputs already exist and are newer (default: skip them)",
    )
    g.add_argument(
        "--prompt",
        metavar="TEXT",
        help="task prompt for every page (default: the model entry's prompt, e.g. "
        "'<image>\\n<|grounding|>Convert the document to markdown.' for deepseek-ocr)",
    )
    g.add_argument(
        "--dpi",
        dest="pdf_dpi",
        metavar="N",
        type=server_cli._typed("pdf_dpi", int),
        default=argparse.SUPPRESS,
        help=f"PDF rendering resolution, {PDF_DPI_RANGE[0]}..{PDF_DPI_RANGE[1]}; [server] pdf_dpi of the config file "
        f"(default: {ServerSettings().pdf_dpi})",
    )
    g.add_argument(
        "--pages",
        metavar="SPEC",
        type=_pages,
        help='pages to read of every document, e.g. "1-3,7" or "5-"; a document without those pages fails '
        "(default: all)",
    )

    g = p.add_argument_group("remote server (instead of loading the model here)")
    g.add_argument(
        "--server",
        metavar="URL",
        help="send the pages to this deepseek-ocr-server (or OpenAI-compatible server), "
        "e.g. http://localhost:8000 (default: run the model in this process)",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        help="bearer key for --server (default: env DEEPSEEK_OCR_API_KEY, else [server] api_key "
        "of the config file, else none)",
    )
    g.add_argument(
        "--jobs",
        metavar="N",
        type=_positive,
        help="pages in flight at once: concurrent requests with --server, pages queued for the "
        "batched engine otherwise (default: 8 with --server, else max-running + 2)",
    )
    g.add_argument(
        "--request-timeout",
        metavar="SECONDS",
        type=float,
        default=600.0,
        help="longest wait for one page's answer from --server (default: 600)",
    )

    server = server_cli.build_parser()
    for group in server._action_groups:  # the server's own flag objects: same names, checks and help
        title = group.title or ""
        shared = [
            a for a in group._group_actions if title.startswith(_SHARED_GROUPS) or a.dest in _SHARED_FLAGS
        ]
        if not shared:
            continue
        name = (
            "decoding"
            if title.startswith("decoding")
            else title
            if title.startswith(_SHARED_GROUPS)
            else ("in-process engine")
        )
        target = p.add_argument_group(name)
        for action in shared:
            target._add_action(action)

    g = p.add_argument_group("misc")
    g.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output (errors and the summary only)"
    )
    g.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.upper,
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: WARNING)",
    )
    g.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _pages(text: str) -> str:
    try:
        # the syntax only (each document checks its own length): as if the last page were the highest named
        pipeline.selected_pages(text, max([int(n) for n in re.findall(r"\d+", text)] or [1]))
    except pipeline.DocumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_OWN = {
    "inputs",
    "output_dir",
    "format",
    "boxes",
    "overwrite",
    "prompt",
    "pages",
    "server",
    "api_key",
    "jobs",
    "request_timeout",
    "quiet",
    "log_level",
}


def _summary(summary: Summary, progress: Progress, seconds: float) -> None:
    n = len(summary.done) + len(summary.skipped) + len(summary.failed)
    parts = [f"{len(summary.done)} written"]
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} skipped (up to date)")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    rate = f" ({summary.pages / seconds * 60:.1f} pages/min)" if summary.pages and seconds > 0 else ""
    head = "interrupted: " if summary.interrupted else ""
    line = (
        f"deepseek-ocr: {head}{n} document{'s' if n != 1 else ''}: {', '.join(parts)}; "
        f"{summary.pages} page{'s' if summary.pages != 1 else ''} in {seconds:.1f} s{rate}"
    )
    if summary.failed or summary.interrupted or summary.fatal or not progress.quiet:
        progress.error(line)
    if summary.failed:
        progress.error("failed:")
        for name, reason in summary.failed:
            progress.error(f"  {name}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: dict[str, Any] = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=getattr(logging, args["log_level"]), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    shared = {k: v for k, v in args.items() if k not in _OWN}
    config_path = shared.pop("config", None)
    try:
        settings = load_settings(shared, config_path)
    except ConfigError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    model_id = settings.active
    kind = settings.entry(model_id).kind

    from .engines import Engine, HttpEngine, InProcessEngine

    engine: Engine
    if args["server"]:
        local = [k for k in _LOCAL_ONLY if k in shared]
        if local:
            flags = ", ".join("--" + k.replace("_", "-") for k in local)
            parser.exit(
                2, f"{PROG}: error: {flags}: only for a model run in this process, not with --server\n"
            )
        jobs = args["jobs"] or 8
        api_key = args["api_key"] or settings.server.api_key
        engine = HttpEngine(
            args["server"],
            api_key,
            model_id,
            kind,
            args["prompt"],
            settings.cli_inference,
            args["request_timeout"],
        )
    else:
        device = settings.inference_for(model_id).device
        reason = server_cli.check_device(device)
        if reason:
            parser.exit(2, f"{PROG}: error: --device {device}: {reason}\n")
        jobs = args["jobs"] or settings.server.max_running + 2
        engine = InProcessEngine(settings, model_id, args["prompt"], jobs)

    try:
        docs = discover(list(args["inputs"]), args["output_dir"])
    except UsageError as exc:
        parser.exit(2, f"{PROG}: error: {exc} (see --help)\n")

    opts = RunOptions(
        model_id=model_id,
        fmt=args["format"],
        boxes=args["boxes"],
        overwrite=args["overwrite"],
        jobs=jobs,
        dpi=settings.server.pdf_dpi,
        pages=args["pages"],
        max_pixels=settings.server.max_image_pixels,
    )
    progress = Progress(quiet=args["quiet"])
    run = BatchRun(docs, engine, opts, progress)
    t0 = time.monotonic()
    try:
        asyncio.run(run.run())
    except KeyboardInterrupt:
        run.summary.interrupted = True
    finally:
        progress.close()
    _summary(run.summary, progress, time.monotonic() - t0)
    return run.summary.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
