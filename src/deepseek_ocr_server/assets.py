"""Where a model's files come from: explicit path > config entry path > cache dir > download.

Per file (config.json, tokenizer.json, the weights):

1. an explicit path: ``--model-config`` / ``--tokenizer`` / ``--weights`` (they apply to the model chosen
   by ``--model``) or the entry's ``config`` / ``tokenizer`` / ``weights`` in config.toml (the flags are
   merged over the entry by :func:`~.config.load_settings`, so a flag wins);
2. the file in ``<cache>/models/<id>/`` (``model.safetensors``, or ``*.safetensors.index.json`` + shards, or one lone ``*.safetensors``);
3. a download from the entry's Hugging Face repo with ``huggingface_hub`` (honours ``HF_HOME``,
   ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``; progress bars; atomic: a partial
   download is a ``.incomplete`` file that is never taken for a finished one). The downloaded file is
   then hard-linked (else symlinked, else copied) into ``<cache>/models/<id>/`` so the next start finds
   it in step 2. In offline mode, files already in the Hugging Face cache (a shared ``HF_HOME``) are used.

Optional side files (``tokenizer_config.json``, ``generation_config.json``, ``preprocessor_config.json``,
``chat_template.jinja``, ...) are fetched with the required ones when the repo has them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .models.base import ModelFiles

log = logging.getLogger(__name__)

#: ``report(file_name, bytes_done, bytes_total)`` while a file downloads (``bytes_total`` None: unknown)
DownloadReport = Callable[[str, int, "int | None"], None]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
)
#: Records which repo/revision filled a cache dir (files put there by hand have no marker).
SOURCE_MARKER = ".source.json"

_FLAGS = {"config": "--model-config", "tokenizer": "--tokenizer", "weights": "--weights"}


class AssetError(RuntimeError):
    """A model file is missing and could not be obtained; the message says how to supply it."""


@dataclass(frozen=True)
class _Wanted:
    config: Path | None
    tokenizer: Path | None
    weights: Path | None


def _how_to_supply(settings: Settings, model_id: str, *whats: str) -> str:
    flags = " ".join(f"{_FLAGS[w]} PATH" for w in whats)
    keys = ", ".join(f'`{w} = "PATH"`' for w in whats)
    return (
        f"supply {'it' if len(whats) == 1 else 'them'} by hand with {flags} (with --model {model_id}), "
        f"or set {keys} in [models.entries.{model_id}] of {settings.config_path}, or put the "
        f"file{'s' if len(whats) > 1 else ''} in {settings.model_dir(model_id)}/"
    )


# --------------------------------------------------------------------------------------------------
# cache dir
# --------------------------------------------------------------------------------------------------
def _weights_in(directory: Path) -> Path | None:
    """The weights in a model dir: a shard index whose shards all exist, else model.safetensors."""
    for index in sorted(directory.glob("*.safetensors.index.json")):
        shards = _index_shards(index)
        if shards and all((directory / s).is_file() for s in shards):
            return index
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return single
    if any(directory.glob("*.safetensors.index.json")):
        return None  # an index with missing shards: fetch them, never guess
    lone = [p for p in directory.glob("*.safetensors") if not p.name.startswith(".")]
    return lone[0] if len(lone) == 1 else None  # e.g. model-00001-of-000001.safetensors without its index


def _index_shards(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        return sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _cache_is_current(settings: Settings, model_id: str) -> bool:
    """False when the cache dir was filled from another repo/revision than the entry's now."""
    marker = settings.model_dir(model_id) / SOURCE_MARKER
    if not marker.is_file():
        return True
    try:
        src = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    entry = settings.entry(model_id)
    return src.get("repo") == entry.repo and src.get("revision") == entry.revision


def _forget_previous_fill(settings: Settings, model_id: str) -> list[str]:
    """Files fetched earlier into the model dir from the entry's current repo/revision (per the marker).

    When the dir was filled from another repo/revision, those files are removed first (so that e.g. an
    old shard index never shadows a new model.safetensors) and the list is empty. Files put there by
    hand are never listed and stay."""
    d = settings.model_dir(model_id)
    try:
        old = json.loads((d / SOURCE_MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        old = []
    old = [n for n in old if isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")]
    if _cache_is_current(settings, model_id):
        return old
    for name in old:
        (d / name).unlink(missing_ok=True)
    return []


def _from_cache(settings: Settings, model_id: str) -> _Wanted:
    d = settings.model_dir(model_id)
    if not d.is_dir() or not _cache_is_current(settings, model_id):
        return _Wanted(None, None, None)
    cfg, tok = d / CONFIG_FILE, d / TOKENIZER_FILE
    return _Wanted(cfg if cfg.is_file() else None, tok if tok.is_file() else None, _weights_in(d))


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------
def _hub_cache_dir() -> str | None:
    """The Hugging Face cache, read from the environment now (the library reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def describe_hub() -> str:
    """One line for the start-up log: where downloads come from and where the HF cache is."""
    from huggingface_hub import constants

    where = _endpoint() or constants.ENDPOINT
    cache = _hub_cache_dir() or constants.HF_HUB_CACHE
    source = "off (HF_HUB_OFFLINE=1)" if _offline() else f"from {where}"
    return f"{source}, Hugging Face cache {cache}"


def _endpoint() -> str | None:
    ep = os.environ.get("HF_ENDPOINT")
    return ep.rstrip("/") if ep else None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _list_repo(repo: str, revision: str) -> tuple[list[str] | None, bool]:
    """Top-level file names of the repo (online; second item True), or of its snapshot in the HF cache
    (offline / unreachable; second item False; may be partial); None when neither is available."""
    from huggingface_hub import HfApi, snapshot_download

    if not _offline():
        try:
            info = HfApi(endpoint=_endpoint()).model_info(repo, revision=revision)
            return [s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename], True
        except Exception as exc:  # noqa: BLE001 - fall back to the local HF cache, reported below
            log.warning("cannot list %s@%s on the Hub (%s); trying the local Hugging Face cache", repo,
                        revision, _short(exc))
            listing_error: Exception | None = exc
    else:
        listing_error = None
    try:
        snap = snapshot_download(repo, revision=revision, cache_dir=_hub_cache_dir(), local_files_only=True)
    except Exception:  # noqa: BLE001
        if listing_error is not None:
            raise _ListingFailed(listing_error) from listing_error
        return None, False
    return sorted(p.name for p in Path(snap).iterdir() if p.is_file()), False


class _ListingFailed(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _download(repo: str, revision: str, filename: str, report: DownloadReport | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    log.info("fetching %s from %s@%s (Hugging Face cache, else download)", filename, repo, revision)
    path = hf_hub_download(
        repo,
        filename,
        revision=revision,
        cache_dir=_hub_cache_dir(),
        endpoint=_endpoint(),
        local_files_only=_offline(),
        tqdm_class=_reporting_bar(filename, report) if report is not None else None,
    )
    return Path(path)


def _reporting_bar(filename: str, report: DownloadReport) -> type:
    """huggingface_hub's progress bar (shown as usual) that also tells ``report`` the bytes so far."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class ReportingBar(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            total = kwargs.get("total")
            self._report_total = int(total) if isinstance(total, int | float) else None
            self._report_done = int(kwargs.get("initial") or 0)  # type: ignore[call-overload]
            report(filename, self._report_done, self._report_total)

        def update(self, n: float | None = 1) -> bool | None:
            self._report_done += int(n or 0)  # counted here: a disabled bar does not count
            report(filename, self._report_done, self._report_total)
            return super().update(n)

    return ReportingBar


def _place(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: hard link (no extra space, survives HF cache pruning), else
    symlink, else copy."""
    real = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(real, tmp)
    except OSError:
        try:
            os.symlink(real, tmp)
        except OSError:
            shutil.copyfile(real, tmp)
    os.replace(tmp, dst)


def _choose_weights(files: list[str]) -> list[str]:
    """Weights files to fetch from a repo listing: model.safetensors, else an index (+ its shards,
    known after reading it), else a lone *.safetensors file."""
    if WEIGHTS_FILE in files:
        return [WEIGHTS_FILE]
    index = sorted(f for f in files if f.endswith(".safetensors.index.json"))
    if index:
        return [index[0]]
    single = sorted(f for f in files if f.endswith(".safetensors"))
    if len(single) == 1:
        return single
    return []


def _explain(exc: BaseException, repo: str, revision: str, filename: str, how: str) -> AssetError:
    from huggingface_hub import errors

    cause = exc.cause if isinstance(exc, _ListingFailed) else exc
    where = f"{repo}@{revision}" if revision != "main" else repo
    if isinstance(cause, errors.GatedRepoError):
        why = "the repo is gated: accept its licence on the Hub and set HF_TOKEN"
    elif isinstance(cause, errors.RepositoryNotFoundError):
        why = "repository not found (or private: set HF_TOKEN)"
    elif isinstance(cause, errors.RevisionNotFoundError):
        why = f"revision {revision!r} not found"
    elif isinstance(cause, errors.OfflineModeIsEnabled | errors.LocalEntryNotFoundError):
        why = ("not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)" if _offline()
               else f"the Hub is unreachable and the file is not cached ({_short(cause)})")
    elif isinstance(cause, errors.EntryNotFoundError):  # the remote 404 (local misses handled above)
        why = "the file does not exist in the repo (404)"
    elif isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        why = "no space left on the device (free some space or point HF_HOME at a bigger disk)"
    elif isinstance(cause, errors.HfHubHTTPError | OSError):
        why = _short(cause)
    else:  # connection refused, DNS, timeout, TLS...
        why = (f"cannot reach the Hub at {_endpoint() or 'https://huggingface.co'} ({_short(cause)}); on a machine "
               "without network set HF_HUB_OFFLINE=1 and use files already in the cache")
    return AssetError(f"cannot get {filename} of model repo {where}: {why}; {how}")


def _fetch(
    settings: Settings, model_id: str, need: set[str], target: Path, report: DownloadReport | None = None
) -> dict[str, Path]:
    """Download the files of ``need`` (subset of config/tokenizer/weights) plus side files into ``target``."""
    entry = settings.entry(model_id)
    repo, revision = entry.repo, entry.revision
    if not repo:
        raise AssetError(
            f"model {model_id!r} has no `repo` in [models.entries.{model_id}] to download its "
            f"{', '.join(sorted(need))} from: " + _how_to_supply(settings, model_id, *sorted(need))
        )
    try:
        listing, complete = _list_repo(repo, revision)
    except _ListingFailed as exc:
        names = {"config": CONFIG_FILE, "tokenizer": TOKENIZER_FILE, "weights": "the weights"}
        missing = ", ".join(names[w] for w in sorted(need))
        raise _explain(exc, repo, revision, missing, _how_to_supply(settings, model_id, *sorted(need))) from exc.cause
    # Mark the dir as filled from this repo/revision before the first file lands, so that a partial
    # fill is never mistaken for another revision's files.
    target.mkdir(parents=True, exist_ok=True)
    marker_path = target / SOURCE_MARKER
    fetched: list[str] = _forget_previous_fill(settings, model_id)

    def save_marker(commit: str | None = None) -> None:  # rewritten as files land (tiny JSON)
        marker = {"repo": repo, "revision": revision, "commit": commit, "files": fetched}
        marker_path.write_text(json.dumps(marker) + "\n", encoding="utf-8")

    save_marker()
    plan: dict[str, list[str]] = {}
    if "config" in need:
        plan["config"] = [CONFIG_FILE]
    if "tokenizer" in need:
        plan["tokenizer"] = [TOKENIZER_FILE]
    if "weights" in need:
        plan["weights"] = _choose_weights(listing or [])
        if not plan["weights"] and not complete:
            plan["weights"] = [WEIGHTS_FILE]  # unknown offline: try the usual name, fail with a clear error
        if not plan["weights"]:
            raise AssetError(f"model repo {repo} has no model.safetensors or *.safetensors.index.json; "
                             + _how_to_supply(settings, model_id, "weights"))
    side = [f for f in SIDE_FILES if listing is not None and f in listing]

    got: dict[str, Path] = {}
    commit: str | None = None
    for what, names in plan.items():
        for name in names:
            try:
                src = _download(repo, revision, name, report)
                _place(src, target / name)
            except Exception as exc:  # noqa: BLE001 - turned into a helpful AssetError
                raise _explain(exc, repo, revision, name, _how_to_supply(settings, model_id, what)) from exc
            commit = commit or src.parent.name
            if name not in fetched:
                fetched.append(name)
            save_marker()
            if name.endswith(".safetensors.index.json"):
                shards = _index_shards(target / name)
                if not shards:
                    raise AssetError(f"{repo}/{name}: not a valid safetensors index (no weight_map)")
                names.extend(s for s in shards if s not in names)
        got[what] = target / names[0]
    for name in side:
        try:
            _place(_download(repo, revision, name, report), target / name)
            if name not in fetched:
                fetched.append(name)
        except Exception as exc:  # noqa: BLE001 - optional file
            log.warning("optional file %s of %s not fetched: %s", name, repo, _short(exc))
    save_marker(commit)
    return got


# --------------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------------
def resolve_model_files(
    settings: Settings, model_id: str, *, download: bool = True, report: DownloadReport | None = None
) -> ModelFiles:
    """Resolve (and, with ``download``, fetch what is missing of) ``model_id``'s files; ``report`` hears
    how far each download got (``/health`` shows it).

    Raises :class:`AssetError` naming the repo, the file and how to supply it by hand.
    """
    entry = settings.entry(model_id)
    explicit = {"config": entry.config, "tokenizer": entry.tokenizer, "weights": entry.weights}
    for what, path in explicit.items():
        if path is not None and not path.is_file():
            raise AssetError(
                f"{what} file {path} for model {model_id!r} does not exist (given by {_FLAGS[what]} or "
                f"[models.entries.{model_id}].{what} in {settings.config_path})"
            )
    target = settings.model_dir(model_id)
    cached = _from_cache(settings, model_id)
    resolved: dict[str, Path | None] = {
        what: explicit[what] or getattr(cached, what) for what in ("config", "tokenizer", "weights")
    }
    missing = {what for what, p in resolved.items() if p is None}
    if missing:
        if not download:
            what = sorted(missing)[0]
            raise AssetError(f"{what} of model {model_id!r} is not in {target}/ and downloads are off; "
                             + _how_to_supply(settings, model_id, what))
        if not _cache_is_current(settings, model_id):
            log.info("%s was filled from another repo/revision; fetching %s@%s", target, entry.repo, entry.revision)
        resolved.update(_fetch(settings, model_id, missing, target, report))
    for what, p in resolved.items():
        log.debug("%s %s: %s", model_id, what, p)
    config = resolved["config"]
    assert config is not None and resolved["weights"] is not None and resolved["tokenizer"] is not None
    extras = config.parent if explicit["config"] is not None and _has_side_files(config.parent) else target
    return ModelFiles(
        config=config,
        weights=resolved["weights"],
        tokenizer=resolved["tokenizer"],
        extras_dir=extras if extras.is_dir() else None,
    )


def _has_side_files(d: Path) -> bool:
    return any((d / f).is_file() for f in SIDE_FILES)


__all__ = ["AssetError", "resolve_model_files", "SIDE_FILES"]
