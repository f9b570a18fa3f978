"""The READMEs stay in step with the code: every flag documented, the default config file verbatim,
and the quick-start test command equal to what CI runs.

The default config file shown in both READMEs is generated (``config.default_config_toml``, from the
family specs and the settings table); ``python tests/test_foundation_readme.py`` rewrites both blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepseek_ocr_server.cli import build_parser
from deepseek_ocr_server.config import DEFAULT_CONFIG_TOML, default_config_toml

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


#: the fenced block of the default config file (its first line is the generated text's first line)
_CONFIG_BLOCK = re.compile(r"```toml\n(# deepseek-ocr-server configuration\..*?)```\n", re.S)


@pytest.mark.parametrize("readme", READMES)
def test_default_config_file_is_shown_verbatim(readme: str) -> None:
    assert DEFAULT_CONFIG_TOML == default_config_toml()  # the file written is the generated one
    blocks = _CONFIG_BLOCK.findall(section(readme, "config"))
    assert blocks == [DEFAULT_CONFIG_TOML], (
        f"{readme}: the default config block differs from config.default_config_toml(); "
        "run `python tests/test_foundation_readme.py` to regenerate it"
    )


def regenerate() -> None:
    """Rewrite the default config block of both READMEs from the generator."""
    for readme in READMES:
        path = ROOT / readme
        text = path.read_text(encoding="utf-8")
        new, n = _CONFIG_BLOCK.subn(lambda _m: f"```toml\n{default_config_toml()}```\n", text)
        assert n == 1, f"{readme}: {n} default config blocks"
        path.write_text(new, encoding="utf-8")


@pytest.mark.parametrize("readme", READMES)
def test_quickstart_test_command_is_what_ci_runs(readme: str) -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m p")]
    ci_cmds = [re.sub(r" -q(?= )", "", c) if "pip" in c else c for c in ci_cmds]  # pip's -q is cosmetic
    ci_cmds = [c for c in ci_cmds if "--upgrade pip" not in c]
    quick = section(readme, "quickstart")
    line = next(ln for ln in quick.splitlines() if "pytest" in ln and ln.startswith("python3 -m venv"))
    assert line.split(" && ")[2:] == ci_cmds


if __name__ == "__main__":
    regenerate()


@pytest.mark.parametrize("readme", READMES)
def test_flag_table_defaults_are_the_settings_table(readme: str) -> None:
    """The flag table's default column shows each setting's default (``settings.py``) and names every
    family with its own (``models/<family>/spec.py``)."""
    from deepseek_ocr_server.models import registry
    from deepseek_ocr_server.settings import SETTINGS_TABLE

    table = section(readme, "flags")
    checked = 0
    for s in SETTINGS_TABLE:
        if s.flag_name is None or s.default is None:
            continue
        m = re.search(rf"^\| `{re.escape(s.flag_name)}[ `][^|]*\| ([^|]*) \|", table, re.M)
        assert m, f"{readme}: {s.flag_name} missing"
        column = m.group(1)
        shown = re.match(r"`([^`]*)`", column)
        assert shown, f"{readme}: {s.flag_name}: no default in {column!r}"
        value = shown.group(1)
        if s.kind in ("int", "float"):
            assert float(value) == float(s.default), f"{readme}: {s.flag_name} shows {value}, default {s.default}"
        else:
            assert value == (str(s.default).lower() if s.kind == "bool" else str(s.default)), s.flag_name
        for f in registry.builtin_families():
            if s.name in f.defaults:
                named = re.search(rf"(?<![\w.-]){re.escape(f.kind)}(?![\w-]|\.\d)", column)
                assert named, f"{readme}: {s.flag_name}: {f.kind}'s own default is not shown"
        checked += 1
    assert checked >= 20
