"""Post-processing as pure functions on model outputs in the families' formats: every grounding tag shape
(several boxes, labels with spaces, missing closing tags, out-of-range and broken coordinates, stray
markers), OTSL tables with merged cells, formulas; streaming gives the same text as the whole; the
layout picture."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from deepseek_ocr_server.documents import Block, StreamCleaner, draw_layout, for_kind, layout_png
from deepseek_ocr_server.documents.postprocess import GROUNDING, OTSL, PLAIN, POSTPROCESSORS, register
from deepseek_ocr_server.documents.postprocess.grounding import parse_boxes
from deepseek_ocr_server.documents.postprocess.otsl import otsl_to_html
from deepseek_ocr_server.models import registry

W, H = 1000, 2000

# a "convert the document to markdown" answer in DeepSeek-OCR's grounding format
PAGE = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 90]]<|/det|>\n# 1. Introduction\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 100, 900, 300]]<|/det|>\nWe define $f \\coloneqq g$ and $h \\eqqcolon k$.\n\n\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 320, 500, 600]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 610, 500, 640]]<|/det|>\nFigure 1: a cat.\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 650, 900, 900]]<|/det|>\n<table><tr><td>a</td><td>b</td></tr></table>\n"
)


def test_a_grounded_page_becomes_clean_markdown_and_located_blocks() -> None:
    links: list[tuple[int, int, int, int]] = []
    content = GROUNDING.process(PAGE, W, H, lambda box: links.append(box) or "fig1.jpg")
    assert content.markdown == (
        "# 1. Introduction\n\nWe define $f := g$ and $h =: k$.\n\n![](fig1.jpg)\n\nFigure 1: a cat.\n\n"
        "<table><tr><td>a</td><td>b</td></tr></table>"
    )
    assert [b.type for b in content.blocks] == ["title", "text", "image", "image_caption", "table"]
    title = content.blocks[0]
    assert title.bbox == (100, 100, 900, 180)  # int(v / 999 * size)
    assert title.bbox_norm == (0.1, 0.05, 0.9, 0.09)
    assert title.text == "# 1. Introduction"
    assert content.blocks[1].text == "We define $f := g$ and $h =: k$."
    assert content.blocks[2].figure == "fig1.jpg" and content.blocks[2].text == ""
    assert links == [(100, 640, 500, 1201)]
    assert content.dropped_boxes == 0
    assert for_kind("deepseek-ocr") is GROUNDING and for_kind("deepseek-ocr-2") is GROUNDING
    assert for_kind("paddleocr-vl") is OTSL


def test_several_boxes_labels_with_spaces_and_locate_answers() -> None:
    text = "<|ref|>the red car<|/ref|><|det|>[[10, 20, 30, 40], [500,500,999,999]]<|/det|>"
    content = GROUNDING.process(text, 999, 999)
    assert content.markdown == ""
    assert [(b.type, b.bbox) for b in content.blocks] == [
        ("the red car", (10, 20, 30, 40)),
        ("the red car", (500, 500, 999, 999)),
    ]
    # figures with several boxes get one link each
    fig = GROUNDING.process(
        "<|ref|>image<|/ref|><|det|>[[0,0,10,10],[20,20,30,30]]<|/det|>", 999, 999, lambda box: f"f{box[0]}"
    )
    assert fig.markdown == "![](f0)\n![](f20)"


@pytest.mark.parametrize(
    ("text", "markdown", "boxes", "dropped"),
    [
        # <|/ref|> missing before <|det|>: tolerated
        ("<|ref|>text<|det|>[[1,2,3,4]]<|/det|>\nHello", "Hello", 1, 0),
        # <|/det|> missing: the box list ends where the text starts
        ("<|ref|>text<|/ref|><|det|>[[1,2,3,4]]\n1. First", "1. First", 1, 0),
        # truncated inside the box at the end of the answer (budget hit)
        ("Intro\n<|ref|>text<|/ref|><|det|>[[1,2,3", "Intro", 0, 1),
        # truncated inside the label
        ("Intro <|ref|>tex", "Intro", 0, 1),
        # a tag without a box, then text
        ("<|ref|>title<|/ref|>Heading", "Heading", 0, 1),
        # coordinates out of range are clamped; zero-area boxes dropped
        ("<|ref|>text<|/ref|><|det|>[[-5, 10, 1200, 20], [7, 7, 7, 9]]<|/det|>x", "x", 1, 1),
        # not numbers at all: the tag is broken (its text kept) and its <|/det|> is then a stray marker
        ("<|ref|>text<|/ref|><|det|>[[a, b]]<|/det|>y", "[[a, b]]y", 0, 2),
        # stray closing markers are removed and counted
        ("a<|/det|>b<|/ref|>c", "abc", 0, 2),
        # a label that runs on (newline) is text, not a label
        ("<|ref|>this is\nbody text", "this is\nbody text", 0, 1),
        # a tag broken by the next tag
        ("<|ref|>x<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>z", "z", 1, 1),
        # 5 numbers in a box: dropped, counted
        ("<|ref|>text<|/ref|><|det|>[[1,2,3,4,5]]<|/det|>w", "w", 0, 1),
    ],
)
def test_malformed_tags_keep_the_text_and_count_the_broken_boxes(
    text: str, markdown: str, boxes: int, dropped: int
) -> None:
    content = GROUNDING.process(text, 999, 999)
    assert content.markdown == markdown
    assert sum(b.bbox is not None for b in content.blocks) == boxes
    assert content.dropped_boxes == dropped


def test_box_clamping_and_ordering() -> None:
    assert parse_boxes("[[-5, 10, 1200, 20]]") == ([(0, 10, 999, 20)], 0)
    assert parse_boxes("[[30, 40, 10, 20]]") == ([(10, 20, 30, 40)], 0)
    assert parse_boxes("[[1, 2, 3, 4], [5, 6") == ([(1, 2, 3, 4)], 1)
    assert parse_boxes("[[1.5, 2, 3, 4]]") == ([(2, 2, 3, 4)], 0)


TABLE = (
    "<ched>Name<lcel><ched>Score<nl>"
    "<fcel>first<fcel>last<fcel>\\(x^2\\)<nl>"
    "<fcel>A<fcel>B<fcel>1<nl>"
    "<ucel><fcel>C<fcel>2<nl>"
)


def test_otsl_tables_with_merged_cells_become_html() -> None:
    assert otsl_to_html(TABLE) == (
        '<table><tr><th colspan="2">Name</th><th>Score</th></tr>'
        "<tr><td>first</td><td>last</td><td>$x^2$</td></tr>"
        '<tr><td rowspan="2">A</td><td>B</td><td>1</td></tr>'
        "<tr><td>C</td><td>2</td></tr></table>"
    )
    # a 2-D span: lcel to the right, ucel below, xcel in the corner
    assert otsl_to_html("<fcel>big<lcel><fcel>r<nl><ucel><xcel><ecel><nl><fcel>a<fcel>b<fcel>c<nl>") == (
        '<table><tr><td colspan="2" rowspan="2">big</td><td>r</td></tr><tr><td></td></tr>'
        "<tr><td>a</td><td>b</td><td>c</td></tr></table>"
    )
    # malformed: a merge tag with nothing to merge into is an empty cell (which the ucel below then
    # joins), a short row is padded, text is escaped
    assert otsl_to_html("<lcel>x<fcel>a<b<nl><ucel><nl>") == (
        '<table><tr><td rowspan="2"></td><td>a&lt;b</td></tr><tr><td></td></tr></table>'
    )
    content = OTSL.process("Table 2\n" + TABLE, 500, 400)
    assert content.markdown.startswith('Table 2\n\n<table><tr><th colspan="2">')
    assert [(b.type, b.bbox) for b in content.blocks] == [("table", None)]


def test_paddle_formulas_and_plain_text() -> None:
    content = OTSL.process(
        "Energy \\( E = mc^2 \\) and\n\\[ \\int_0^1 x\\,dx \\]\nkeep \\\\[2pt] as is", 10, 10
    )
    assert content.markdown == "Energy $E = mc^2$ and\n$$\\int_0^1 x\\,dx$$\nkeep \\\\[2pt] as is"
    assert [(b.type, b.bbox) for b in content.blocks] == [("text", None)]


def test_unknown_kinds_pass_text_through_and_families_can_share_a_processor() -> None:
    assert for_kind("fake") is PLAIN
    assert PLAIN.process(" a  b ", 1, 1).markdown == " a  b "
    registry.register(
        registry.FamilySpec(kind="test-family-with-grounding", title="t", model="x:Y", postprocess="grounding")
    )
    try:
        assert for_kind("test-family-with-grounding") is GROUNDING
    finally:
        registry.unregister("test-family-with-grounding")
    register("test-format", PLAIN)  # a new output format, named by a spec's ``postprocess``
    assert POSTPROCESSORS["test-format"] is PLAIN
    del POSTPROCESSORS["test-format"]


RECORDED = [
    (GROUNDING, PAGE),
    (
        GROUNDING,
        "<|ref|>text<|/ref|><|det|>[[1,2,3,4]]\n1. First \\coloneq \\coloneqq<|ref|>x<|/ref|><|det|>[[1,2",
    ),
    (
        GROUNDING,
        "a<|/det|>b<|ref|>this is\nbody<|ref|>image<|/ref|><|det|>[[0,0,500,500]]<|/det|>\n\n\n\nend\n\n",
    ),
    (OTSL, "Table 2\n" + TABLE),
    (OTSL, "Energy \\( E = mc^2 \\) and\n\\[ \\int_0^1 x\\,dx \\]\nkeep \\\\[2pt] \\(open"),
    # words right after a figure (whose link is followed by a newline), spaces held at the end of words
    (GROUNDING, "  lead  words <|ref|>image<|/ref|><|det|>[[0,0,9,9]]<|/det|>after  it  \n\nmore   words  "),
    (OTSL, "  plain  words  then \\(x\\)  end  "),
    (PLAIN, "  a  b  "),
]


@pytest.mark.parametrize(("pp", "text"), RECORDED)
def test_streaming_cleaner_emits_exactly_the_clean_markdown(pp, text: str) -> None:  # noqa: ANN001
    whole = pp.process(text, W, H, lambda box: f"fig{box}").markdown
    pieces = {step: [text[i : i + step] for i in range(0, len(text), step)] for step in (1, 2, 3, 7, 50)}
    pieces["words"] = re.findall(r" ?[^ ]+| +", text)  # what tokenizers give: a space, then a word
    for how, deltas in pieces.items():
        cleaner = StreamCleaner(pp, W, H, lambda box: f"fig{box}")
        out = "".join(cleaner.feed(d) for d in deltas)
        tail, content = cleaner.finish()
        assert out + tail == whole == content.markdown, how
    # the tags never reach the client, not even in part
    cleaner = StreamCleaner(pp, W, H, None)
    for i in range(len(text)):
        assert "<|" not in cleaner.feed(text[i]) and "<fcel" not in cleaner.emitted


def test_layout_picture_has_the_boxes_drawn() -> None:
    page = Image.new("RGB", (400, 300), (255, 255, 255))
    blocks = [
        Block("title", (20, 40, 380, 80), None, "T"),
        Block("image", (50, 120, 350, 280), None, ""),
        Block("text", None, None, "not located"),
    ]
    out = draw_layout(page, blocks)
    assert out.size == page.size and out.mode == "RGB"
    assert out.getpixel((200, 40)) != (255, 255, 255)  # the title box's top edge
    assert out.getpixel((200, 200)) != (255, 255, 255)  # the figure is shaded
    assert out.getpixel((200, 100)) == (255, 255, 255)  # outside every box
    png = layout_png(page, blocks)
    assert Image.open(io.BytesIO(png)).size == (400, 300)
    assert base64.b64encode(png)  # a data URL can carry it
