"""The ``deepseek-ocr`` batch command end to end: folders of PNG/JPEG/PDF/corrupt files with the fake
model and the tiny real checkpoints, resume and --overwrite, stdin -> stdout, --server mode against a
real server, SIGINT mid-run, usage errors, --help."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deepseek_ocr_server.batch import cli as batch_cli
from deepseek_ocr_server.batch import inputs as batch_inputs
from deepseek_ocr_server.batch import outputs as batch_outputs
from deepseek_ocr_server.documents import load_pages, page_prefix
from deepseek_ocr_server.testing.fake import FakeOcrModel, write_fake_checkpoint

SRC = Path(__file__).parents[1] / "src"
PROMPT = "read it (a)"  # the fake-a entry's default prompt (tests/fixtures/server.py)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _config(path: Path, entries: dict[str, dict[str, Any]], active: str, inference: str = "") -> Path:
    lines = ["[models]", f'active = "{active}"']
    for mid, e in entries.items():
        lines.append(f"[models.entries.{mid}]")
        lines += [
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in e.items()
        ]
    lines += ["[inference]", 'dtype = "f32"', inference]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _fake_entry(files: Any, prompt: str = PROMPT) -> dict[str, Any]:
    return {
        "kind": "fake",
        "config": str(files.config),
        "tokenizer": str(files.tokenizer),
        "weights": str(files.weights),
        "prompt": prompt,
    }


def _folder(root: Path) -> Path:
    """A PNG, a JPEG in a sub-folder, a 3-page PDF and a corrupt 'PDF'."""
    d = root / "in"
    (d / "sub").mkdir(parents=True)
    img = Image.new("RGB", (48, 36), (200, 30, 40))
    for x in range(30):
        img.putpixel((x, x), (x * 8, 255 - x, 7))
    img.save(d / "a.png")
    Image.new("RGB", (40, 52), (20, 160, 90)).save(d / "sub" / "b.jpg", quality=90)
    pages = [Image.new("RGB", (60, 80), (40 * i, 90, 200 - 40 * i)) for i in range(3)]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <<>> garbage, no xref\n")
    return d


def _pages_of(path: Path) -> list[Image.Image]:
    """The pages as the shared document pipeline renders them (what the model sees)."""
    return [p.image for p in load_pages(path.read_bytes())]


def _fake_answers(path: Path, **opts: Any) -> list[str]:
    ref = FakeOcrModel(name="fake-a", **opts)
    return [ref.expected_text(ref.prepare(PROMPT, [p]), 64) for p in _pages_of(path)]


def _md(answers: list[str]) -> str:
    """A document's text: each page after its page marker (the fake kind's text needs no cleaning)."""
    return "".join(page_prefix(i + 1, i == 0) + a for i, a in enumerate(answers))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = batch_cli.main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def fake_cfg(tmp_path: Path, fake_checkpoints: dict[str, Any]) -> Path:
    return _config(
        tmp_path / "config.toml",
        {"fake-a": _fake_entry(fake_checkpoints["fake-a"])},
        "fake-a",
        "max_new_tokens = 64",
    )


def test_folder_resume_overwrite(tmp_path: Path, fake_cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(tmp_path)
    out = tmp_path / "out"
    argv = ["--config", str(fake_cfg), str(src), "-o", str(out)]
    code, err = _run(argv, capsys)
    assert code == 1, err
    assert "broken.pdf" in err and "failed" in err
    mains = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.md"))
    assert mains == ["a.md", "doc.md", "sub/b.md"]
    for rel, source in (("a", "a.png"), ("doc", "doc.pdf"), ("sub/b", "sub/b.jpg")):
        answers = _fake_answers(src / source)
        assert (out / f"{rel}.md").read_text(encoding="utf-8") == _md(answers)
        doc = json.loads((out / f"{rel}.json").read_text(encoding="utf-8"))
        assert doc["object"] == "ocr.document" and doc["model"] == "fake-a"
        assert [p["markdown"] for p in doc["pages"]] == answers
        assert [p["page"] for p in doc["pages"]] == list(range(1, len(answers) + 1))
    assert len(_fake_answers(src / "doc.pdf")) == 3
    assert not list(out.rglob(".*")), "temporary files left behind"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # rerun: everything done is skipped (the corrupt file still fails)
    code, err = _run(argv, capsys)
    assert code == 1 and "3 skipped" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # an input newer than its outputs is redone, the others stay skipped
    time.sleep(0.01)
    os.utime(src / "a.png")
    code, err = _run(argv, capsys)
    assert "1 written" in err and "2 skipped" in err, err
    assert (out / "a.md").stat().st_mtime_ns > stamps[out / "a.md"]

    # --overwrite redoes everything, with the same results
    code, err = _run([*argv, "--overwrite"], capsys)
    assert code == 1 and "3 written" in err, err
    assert (out / "doc.md").stat().st_mtime_ns > stamps[out / "doc.md"]
    assert (out / "doc.md").read_text(encoding="utf-8") == _md(_fake_answers(src / "doc.pdf"))

    # without the corrupt file the run succeeds
    (src / "broken.pdf").unlink()
    assert _run(argv, capsys)[0] == 0


def test_raw_format_and_single_files(
    tmp_path: Path, fake_cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path)
    out = tmp_path / "out"
    code, err = _run(
        [
            "--config",
            str(fake_cfg),
            str(src / "doc.pdf"),
            str(src / "sub" / "*.jpg"),
            "--format",
            "raw",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert err == ""  # -q: nothing but errors and failures
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "doc.txt"]
    assert (out / "doc.txt").read_text(encoding="utf-8") == _md(_fake_answers(src / "doc.pdf"))


def test_missing_input_fails_the_rest_runs(
    tmp_path: Path, fake_cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path)
    code, err = _run(
        [
            "--config",
            str(fake_cfg),
            str(src / "a.png"),
            str(tmp_path / "nope.png"),
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 1
    assert "nope.png: no such file or directory" in err
    assert (tmp_path / "out" / "a.md").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no INPUT given"),
        (["-", "a.png"], "cannot be combined"),
        (["x.png", "--server", "http://127.0.0.1:9", "--device", "cpu"], "--device"),
        (["x.png", "--top-p", "1.5"], "--top-p"),
        (["x.png", "--model", "nope"], "unknown model 'nope'"),
        (["x.png", "--jobs", "0"], "--jobs"),
        (["x.png", "--pages", "3-1"], "invalid page range"),
        (["x.png", "--dpi", "20"], "--dpi"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, fake_cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        batch_cli.main(["--config", str(fake_cfg), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_stdin_to_stdout(tmp_path: Path, fake_cfg: Path) -> None:
    src = _folder(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_ocr_server.batch", "--config", str(fake_cfg), "-"],
        input=(src / "doc.pdf").read_bytes(),
        capture_output=True,
        env=_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode("utf-8") == _md(_fake_answers(src / "doc.pdf")) + "\n"


def test_server_mode_matches_in_process(
    tmp_path: Path, fake_cfg: Path, api_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path)
    (src / "broken.pdf").unlink()
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert _run(["--config", str(fake_cfg), str(src), "-o", str(local)], capsys)[0] == 0
    code, err = _run(
        [
            "--config",
            str(fake_cfg),
            str(src),
            "-o",
            str(remote),
            "--server",
            api_server.base_url,
            "--jobs",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    for rel in ("a.md", "doc.md", "sub/b.md"):
        assert (remote / rel).read_text(encoding="utf-8") == (local / rel).read_text(encoding="utf-8")
    # a model the server does not serve stops the run with exit 1 and the reason
    cfg = _config(tmp_path / "other.toml", {"other": {"kind": "fake"}}, "other")
    code, err = _run(
        [
            "--config",
            str(cfg),
            str(src / "a.png"),
            "-o",
            str(remote),
            "--overwrite",
            "--server",
            api_server.base_url,
        ],
        capsys,
    )
    assert code == 1 and "does not serve model 'other'" in err


def test_sigint_leaves_no_partial_file(tmp_path: Path) -> None:
    slow = write_fake_checkpoint(
        tmp_path / "slow", name="fake-a", step_delay=0.03, min_answer=30, answer_span=4
    )
    cfg = _config(tmp_path / "config.toml", {"fake-a": _fake_entry(slow)}, "fake-a", "max_new_tokens = 64")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 100, 7)).save(src / f"p{i}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepseek_ocr_server.batch",
            "--config",
            str(cfg),
            str(src),
            "-o",
            str(out),
            "--max-running",
            "2",
            "--jobs",
            "2",
        ],
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.md")):
            assert proc.poll() is None and time.monotonic() < deadline, "no document finished"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    written = sorted(out.glob("*.md"))
    assert 1 <= len(written) < 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for md in written:
        answers = _fake_answers(src / (md.stem + ".png"), step_delay=0.03, min_answer=30, answer_span=4)
        assert md.read_text(encoding="utf-8") == _md(answers)
        assert (out / (md.stem + ".json")).is_file()


@pytest.mark.parametrize(
    "kind, fixture", [("deepseek-ocr", "deepseek_ckpt"), ("paddleocr-vl", "paddle_ckpt")]
)
def test_real_checkpoints_folder(
    tmp_path: Path,
    kind: str,
    fixture: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The tiny real checkpoints of both families: each page's raw text equals the same page run alone."""
    import torch

    from deepseek_ocr_server.engine.generate import generate
    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
    from deepseek_ocr_server.models.registry import family
    from deepseek_ocr_server.sampling import SamplingParams

    files = ModelFiles.from_dir(request.getfixturevalue(fixture))
    entry = {
        "kind": kind,
        "config": str(files.config),
        "tokenizer": str(files.tokenizer),
        "weights": str(files.weights),
        "base_size": 512,
        "image_size": 512,
        "crop_mode": False,
        "max_new_tokens": 6,
        "no_repeat_ngram_size": 0,
    }
    cfg = _config(tmp_path / "config.toml", {kind: entry}, kind)
    src = _folder(tmp_path)
    out = tmp_path / "out"
    code, err = _run(["--config", str(cfg), str(src), "-o", str(out), "--format", "raw"], capsys)
    assert code == 1 and "broken.pdf" in err, err
    model = load_model(kind, files, device="cpu", dtype=torch.float32)
    vision = VisionSettings(base_size=512, image_size=512, crop_mode=False)
    prompt = family(kind).default_prompt
    for rel, source in (("a", "a.png"), ("doc", "doc.pdf"), ("sub/b", "sub/b.jpg")):
        want = [
            generate(
                model, model.prepare(prompt, [p], vision), SamplingParams(no_repeat_ngram_size=0), 6
            ).text
            for p in _pages_of(src / source)
        ]
        assert (out / f"{rel}.txt").read_text(encoding="utf-8") == _md(want)
    code, err = _run(["--config", str(cfg), str(src / "doc.pdf"), "-o", str(out)], capsys)
    assert code == 0, err
    assert len(json.loads((out / "doc.json").read_text(encoding="utf-8"))["pages"]) == 3


def test_help_lists_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_ocr_server.batch", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: deepseek-ocr INPUT")
    for flag in (
        "--output-dir",
        "--format",
        "--boxes",
        "--overwrite",
        "--prompt",
        "--dpi",
        "--server",
        "--api-key",
        "--jobs",
        "--quiet",
        "--config",
        "--model",
        "--weights",
        "--device",
        "--dtype",
        "--quantize",
        "--base-size",
        "--image-size",
        "--crop-mode",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--no-repeat-ngram-size",
        "--max-running",
    ):
        assert flag in out.stdout, flag
    assert "--port" not in out.stdout and "--host" not in out.stdout
    assert "exit status" in out.stdout


def test_discover_names(tmp_path: Path) -> None:
    for rel in ("x/a.png", "x/a.pdf", "x/deep/c.jpg", "y/a.png", "x/notes.txt", "x/.hidden.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    out = tmp_path / "o"
    docs = batch_inputs.discover(
        [str(tmp_path / "x"), str(tmp_path / "y" / "a.png"), str(tmp_path / "x" / "a.png")], out
    )
    names = [d.out_base.relative_to(out).as_posix() for d in docs if d.out_base]
    assert names == ["a.pdf", "a.png", "deep/c", "a.png-2"]
    # our own output folders beside a NAME.md are not inputs (output folder inside an input folder)
    (tmp_path / "x" / "r.md").write_text("")
    for rel in ("r_images/page-0001-1.jpg", "r_boxes/page-0001.png", "s_images/keep.png"):
        (tmp_path / "x" / rel).parent.mkdir(exist_ok=True)
        (tmp_path / "x" / rel).write_bytes(b"")
    found = [d.name for d in batch_inputs.discover([str(tmp_path / "x")], out)]
    assert not [n for n in found if "r_images" in n or "r_boxes" in n] and any("s_images" in n for n in found)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.md"
    batch_outputs.write_atomic(target, b"old")

    def boom(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        batch_outputs.write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.md"]


def test_png_pages_roundtrip_for_server_mode() -> None:
    from deepseek_ocr_server.batch.engines import api_base, png_data_url

    assert api_base("http://h:8000") == api_base("http://h:8000/v1/") == "http://h:8000/v1"
    img = Image.new("RGB", (5, 4), (1, 2, 3))
    import base64

    raw = base64.b64decode(png_data_url(img).split(",", 1)[1])
    assert Image.open(io.BytesIO(raw)).tobytes() == img.tobytes()


GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 700]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 720, 900, 800]]<|/det|>\nRevenue \\coloneqq grew."
)


class _OpenAIStub:
    """A minimal OpenAI-compatible server answering every chat completion with a recorded DeepSeek-OCR
    grounding answer; it records the request bodies and the Authorization headers."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, obj: dict[str, Any]) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802
                self._json(
                    {
                        "object": "list",
                        "data": [{"id": "deepseek-ocr", "object": "model", "created": 0, "owned_by": "x"}],
                    }
                )

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                stub.auth.append(self.headers.get("Authorization"))
                self._json(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": GROUNDED},
                            }
                        ],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
                    }
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> _OpenAIStub:
        import threading

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_mode_grounding_figures_and_boxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any OpenAI-compatible server: the answer is post-processed here (DeepSeek-OCR grounding -> clean
    markdown, blocks, figure crop files, boxes pictures); typed flags travel as request fields."""
    src = _folder(tmp_path)
    cfg = _config(tmp_path / "config.toml", {}, "deepseek-ocr")
    out = tmp_path / "out"
    with _OpenAIStub() as stub:
        code, err = _run(
            [
                "--config",
                str(cfg),
                str(src / "doc.pdf"),
                "-o",
                str(out),
                "--boxes",
                "--server",
                stub.url,
                "--api-key",
                "k-1",
                "--max-new-tokens",
                "77",
                "--base-size",
                "640",
                "--pages",
                "2-3",
            ],
            capsys,
        )
    assert code == 0, err
    assert len(stub.bodies) == 2 and set(stub.auth) == {"Bearer k-1"}
    body = stub.bodies[0]
    assert body["max_tokens"] == 77 and body["base_size"] == 640 and "temperature" not in body
    part = body["messages"][0]["content"][-1]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    md = (out / "doc.md").read_text(encoding="utf-8")
    assert (
        "<|ref|>" not in md
        and "Revenue := grew." in md
        and "<!-- page 2 -->" in md
        and "page 1 -->" not in md
    )
    assert "![](doc_images/page-0002-1.jpg)" in md and "![](doc_images/page-0003-1.jpg)" in md
    crop = Image.open(out / "doc_images" / "page-0002-1.jpg")
    w, h = _pages_of(src / "doc.pdf")[1].size
    assert abs(crop.width - 0.5 * w) <= 2 and abs(crop.height - 0.5 * h) <= 2
    doc = json.loads((out / "doc.json").read_text(encoding="utf-8"))
    assert [p["page"] for p in doc["pages"]] == [2, 3]
    blocks = doc["pages"][0]["blocks"]
    assert [b["type"] for b in blocks] == ["title", "image", "text"]
    assert blocks[1]["figure"] == "doc_images/page-0002-1.jpg"
    assert blocks[0]["bbox_norm"] == pytest.approx([0.1, 0.05, 0.9, 0.12], abs=0.02)
    assert doc["pages"][0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 9}
    assert sorted(p.name for p in (out / "doc_boxes").iterdir()) == ["page-0002.png", "page-0003.png"]
    assert Image.open(out / "doc_boxes" / "page-0002.png").size == (w, h)
    # --boxes asked later on a finished document: redone, since its boxes are missing
    import shutil

    shutil.rmtree(out / "doc_boxes")
    with _OpenAIStub() as stub:
        code, err = _run(
            [
                "--config",
                str(cfg),
                str(src / "doc.pdf"),
                "-o",
                str(out),
                "--boxes",
                "--server",
                stub.url,
                "--pages",
                "2-3",
            ],
            capsys,
        )
    assert code == 0 and "1 written" in err and (out / "doc_boxes").is_dir()


def test_progress_bar_and_plain_lines() -> None:
    from deepseek_ocr_server.batch.progress import Progress

    bar_out = io.StringIO()
    bar = Progress(stream=bar_out, bar=True)
    bar.add(4)
    bar.start()
    for _ in range(3):
        bar.page_done()
    bar.doc_done("a.pdf", 3, "out/a.md")  # the bar shows it; no separate line
    bar.close()
    text = bar_out.getvalue()
    assert "3/4 pages" in text and "pages/min" in text and "a.pdf" not in text

    plain_out = io.StringIO()
    plain = Progress(stream=plain_out, bar=False)
    plain.add(4)
    plain.start()
    plain.page_done()
    plain.doc_done("a.png", 1, "out/a.md")
    assert plain_out.getvalue().startswith("[1/4 pages, ") and "pages/min, ETA " in plain_out.getvalue()
    assert "a.png: 1 page -> out/a.md" in plain_out.getvalue()

    quiet_out = io.StringIO()
    quiet = Progress(stream=quiet_out, quiet=True)
    quiet.add(1)
    quiet.page_done()
    quiet.doc_done("a.png", 1, "out/a.md")
    quiet.info("x")
    quiet.error("boom")
    assert quiet_out.getvalue() == "boom\n"


@pytest.mark.parametrize("readme", ["README.md", "README_CN.md"])
def test_readme_documents_every_batch_flag(readme: str) -> None:
    import re

    text = (Path(__file__).parents[1] / readme).read_text(encoding="utf-8")
    m = re.search(r"<!-- section:batch .*?-->\n(.*?)<!-- /section:batch -->", text, re.S)
    assert m, f"{readme}: batch section missing"
    section = m.group(1)
    for action in batch_cli.build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--version"):
                assert f"`{flag}" in section, f"{readme}: {flag} not documented in the batch section"


def test_dpi_from_flag_and_config(
    tmp_path: Path, fake_checkpoints: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path)
    entry = {"fake-a": _fake_entry(fake_checkpoints["fake-a"])}
    cfg = _config(tmp_path / "c.toml", entry, "fake-a", "[server]\npdf_dpi = 72")
    out = tmp_path / "out"

    def sizes() -> list[tuple[int, int, int]]:
        doc = json.loads((out / "doc.json").read_text(encoding="utf-8"))
        return [(p["page"], p["width"], p["height"]) for p in doc["pages"]]

    assert _run(["--config", str(cfg), str(src / "doc.pdf"), "-o", str(out), "--pages", "2-"], capsys)[0] == 0
    assert sizes() == [(2, 60, 80), (3, 60, 80)]  # the config's 72 DPI: 60x80 pt pages -> 60x80 px
    assert (
        _run(
            ["--config", str(cfg), str(src / "doc.pdf"), "-o", str(out), "--dpi", "144", "--overwrite"],
            capsys,
        )[0]
        == 0
    )
    assert sizes() == [(1, 120, 160), (2, 120, 160), (3, 120, 160)]  # the flag wins
    code, err = _run(
        ["--config", str(cfg), str(src / "doc.pdf"), "-o", str(out), "--pages", "4", "--overwrite"], capsys
    )
    assert code == 1 and "asks for page 4, but the document has 3 pages" in err
