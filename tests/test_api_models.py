"""The API over the real model families (tiny random checkpoints): answers come from the model asked."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from fixtures.server import REAL_VISION, RunningServer, data_url, load_real, png_bytes, real_model_files
from PIL import Image

from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.sampling import SamplingParams

PNG = png_bytes((30, 60, 90), (40, 28))
IMG = Image.open(io.BytesIO(PNG)).convert("RGB")
MAX_NEW = 6


def _expected(model, text: str) -> tuple[str, str]:  # noqa: ANN001
    prepared = model.prepare(text, [IMG], VisionSettings(**REAL_VISION))
    out = generate(model, prepared, SamplingParams(no_repeat_ngram_size=0), MAX_NEW)
    return out.text, out.finish_reason


def test_switching_between_real_models_concurrently(
    real_server: RunningServer, deepseek_ckpt: Path, paddle_ckpt: Path
) -> None:
    files = real_model_files(deepseek_ckpt, paddle_ckpt)
    texts = ["Free OCR.", "Read the text."]
    refs = {m: load_real(m, files[m]) for m in files}
    expected = {(m, t): _expected(refs[m], t) for m in files for t in texts}
    # the two random models give different answers (otherwise the test could not tell them apart)
    assert expected[("deepseek-ocr", texts[0])] != expected[("paddleocr-vl", texts[0])]

    client = openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0, timeout=300)
    jobs = [(m, t, i % 2 == 1) for i, (m, t) in enumerate(
        [("deepseek-ocr", texts[0]), ("paddleocr-vl", texts[0]), ("deepseek-ocr", texts[1]),
         ("paddleocr-vl", texts[1]), ("paddleocr-vl", texts[0]), ("deepseek-ocr", texts[0])])]

    def run(job: tuple[str, str, bool]) -> tuple[str, str | None]:
        model, text, stream = job
        msgs = [{"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW,
                                                         stream=True))
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return "".join(c.choices[0].delta.content or "" for c in chunks), finish[-1]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW)
        assert r.model == model
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (model, text, _), got in zip(jobs, results, strict=True):
        assert got == expected[(model, text)], (model, text)
    assert set(real_server.loads) == {"deepseek-ocr", "paddleocr-vl"}


def test_real_model_responses_stream(real_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0, timeout=300)
    inp = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(PNG)}]}]
    full = client.responses.create(model="paddleocr-vl", input=inp, max_output_tokens=MAX_NEW)
    with client.responses.stream(model="paddleocr-vl", input=inp, max_output_tokens=MAX_NEW) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        if full.status == "completed":
            assert stream.get_final_response().output_text == full.output_text
    assert "".join(deltas) == full.output_text
    assert full.usage.output_tokens <= MAX_NEW and full.usage.input_tokens > 0
