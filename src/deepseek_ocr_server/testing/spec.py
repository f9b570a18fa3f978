"""The registry entry of the deterministic test model (``testing/fake.py``); light: no torch import."""

from ..models.registry import FamilySpec

SPEC = FamilySpec(
    kind="fake",
    title="fake (tests)",
    model="deepseek_ocr_server.testing.fake:FakeOcrModel",
    options=("base_size", "image_size", "crop_mode"),
    test_checkpoint="deepseek_ocr_server.testing.fake:write_fake_checkpoint",
)
