"""The command line: every flag with its default in --help, bad values exit 2 naming the flag,
booleans, only explicitly passed flags override the config file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_ocr_server import cli

# flag -> the default --help must show (the table, plus the server flags of later issues)
FLAGS = {
    "--tokenizer": "resolved per model",
    "--weights": "resolved per model",
    "--config": "config.toml",
    "--model": "deepseek-ocr",
    "--model-config": "per model",
    "--device": "cpu",
    "--dtype": "cpu -> auto, cuda -> bf16, metal -> f16",
    "--base-size": "1024",
    "--image-size": "640",
    "--crop-mode": "true",
    "--max-new-tokens": "512",
    "--host": "0.0.0.0",
    "--port": "8000",
    "--do-sample": "false",
    "--temperature": "0.0",
    "--top-p": "1.0",
    "--top-k": "none",
    "--repetition-penalty": "1.0",
    "--no-repeat-ngram-size": "20",
    "--seed": "none",
    "--api-key": "none",
    "--allow-private-image-urls": "false",
    "--max-running": "8",
    "--max-queued": "32",
    "--queue-timeout": "300",
    "--prefill-slice": "0.25",
    "--quantize": "none",
    "--cache-dir": "deepseek-ocr",
}


def help_entries() -> dict[str, str]:
    """Flag -> its whole help paragraph (whitespace collapsed)."""
    text = cli.build_parser().format_help()
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s{2}(--[a-z-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    # argparse wraps on hyphens ("deepseek- ocr"); undo that for matching
    return {k: re.sub(r"-\s+", "-", " ".join(v.split())) for k, v in entries.items()}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_help_lists_flag_with_default(flag: str) -> None:
    entries = help_entries()
    assert flag in entries, f"{flag} missing from --help"
    m = re.search(r"\(default: (.*)\)$", entries[flag])
    assert m, f"{flag} help has no '(default: ...)': {entries[flag]}"
    assert FLAGS[flag] in m.group(1), entries[flag]


def test_help_via_console_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "deepseek_ocr_server", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "--no-repeat-ngram-size" in out.stdout and "usage: deepseek-ocr-server" in out.stdout


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--device", "tpu"], "--device"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--port", "70000"], "--port"),
        (["--port", "http"], "--port"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--dtype", "f8"], "--dtype"),
        (["--crop-mode", "maybe"], "--crop-mode"),
        (["--do-sample"], "--do-sample"),  # booleans need an explicit value
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-k", "0"], "--top-k"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size"),
        (["--seed", "-3"], "--seed"),
        (["--base-size", "big"], "--base-size"),
        (["--quantize", "int4"], "--quantize"),
        (["--max-running", "0"], "--max-running"),
        (["--queue-timeout", "0"], "--queue-timeout"),
        (["--prefill-slice", "-1"], "--prefill-slice"),
        (["--allow-private-image-urls", "sure"], "--allow-private-image-urls"),
        (["--frobnicate"], "--frobnicate"),
        (["--model", "nope"], "--model"),
    ],
)
def test_bad_flag_exits_2_with_one_line_naming_it(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--config", str(tmp_path / "c.toml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and "error" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("yes", True), ("YES", True),
                                             ("false", False), ("0", False), ("no", False), ("off", False)])
def test_boolean_spellings(text: str, value: bool) -> None:
    assert cli.parse_args(["--crop-mode", text, "--do-sample", text]) == {"crop_mode": value, "do_sample": value}


def test_only_given_flags_are_overrides() -> None:
    assert cli.parse_args([]) == {}
    got = cli.parse_args(["--port", "9001", "--top-k", "none", "--dtype", "auto", "--seed", "7", "--queue-timeout", "2.5"])
    assert got == {"port": 9001, "top_k": None, "dtype": None, "seed": 7, "queue_timeout": 2.5}


def test_flags_given_beat_the_file_and_others_do_not(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[inference]\nmax_new_tokens = 99\nbase_size = 640\n[server]\nport = 9999\n", encoding="utf-8")
    s = cli.settings_from_args(["--config", str(path), "--base-size", "1280", "--crop-mode", "false"])
    inf = s.inference_for("deepseek-ocr")
    assert (inf.max_new_tokens, inf.base_size, inf.crop_mode) == (99, 1280, False)
    assert s.server.port == 9999  # not passed: the file's value stays


def test_bad_config_file_exits_2_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[inference]\ndevice = "gpu"\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        cli.settings_from_args(["--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "inference.device" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_ocr_server", "--device", "cuda", "--config", str(tmp_path / "c.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "--device" in out.stderr and "CUDA is not available" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without Metal")
def test_metal_unavailable_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.settings_from_args(["--device", "metal", "--config", str(tmp_path / "c.toml")])
    assert exit_.value.code == 2
    assert "Metal (torch mps) is not available" in capsys.readouterr().err


def test_device_from_config_file_is_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.backends.mps.is_available():
        pytest.skip("needs a machine without Metal")
    path = tmp_path / "c.toml"
    path.write_text('[models.entries.paddleocr-vl]\ndevice = "metal"\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        cli.settings_from_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and "metal" in err
