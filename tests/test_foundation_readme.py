"""The READMEs stay in step with the code: every flag documented, the default config file verbatim,
and the quick-start test command equal to what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepseek_ocr_server.cli import build_parser
from deepseek_ocr_server.config import DEFAULT_CONFIG_TOML

ROOT = Path(__file__).parents[1]
READMES = ["README.md", "README_CN.md"]


def section(readme: str, name: str) -> str:
    text = (ROOT / readme).read_text(encoding="utf-8")
    m = re.search(rf"<!-- section:{name} .*?-->\n(.*?)<!-- /section:{name} -->", text, re.S)
    assert m, f"{readme}: section {name} missing"
    return m.group(1)


@pytest.mark.parametrize("readme", READMES)
def test_every_flag_is_in_the_flag_table(readme: str) -> None:
    table = section(readme, "flags")
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(flags) >= 28
    missing = [f for f in flags if not re.search(rf"^\| `{re.escape(f)}[ `]", table, re.M)]
    assert not missing, f"{readme}: flags not documented: {missing}"


@pytest.mark.parametrize("readme", READMES)
def test_default_config_file_is_shown_verbatim(readme: str) -> None:
    assert DEFAULT_CONFIG_TOML.rstrip("\n") in section(readme, "config")


@pytest.mark.parametrize("readme", READMES)
def test_quickstart_test_command_is_what_ci_runs(readme: str) -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m p")]
    ci_cmds = [re.sub(r" -q(?= )", "", c) if "pip" in c else c for c in ci_cmds]  # pip's -q is cosmetic
    ci_cmds = [c for c in ci_cmds if "--upgrade pip" not in c]
    quick = section(readme, "quickstart")
    line = next(ln for ln in quick.splitlines() if "pytest" in ln and ln.startswith("python3 -m venv"))
    assert line.split(" && ")[2:] == ci_cmds
