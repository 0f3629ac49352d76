"""The documentation: the configuration reference lists every schema key, the site builds strictly,
its pictures exist and stay small, and the README keeps the commands CI runs."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.schema import schema_rows

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_configuration_reference_lists_every_schema_key_with_its_default():
    hooks = _hooks()
    assert hooks.MARKER in (DOCS / "configuration.md").read_text()
    table_rows = [line for line in hooks.configuration_markdown().splitlines() if line.startswith("| <code>")]
    cells = {_plain(row.split(" | ")[0].removeprefix("| ")): _plain(row) for row in table_rows}
    keys = [row.key for row in schema_rows()]
    assert list(cells) == keys  # every key, once, in the schema's order
    for row in schema_rows():
        assert row.help.replace("`", "") in cells[row.key].replace("`", ""), row.key
        for choice in row.choices:
            assert choice in cells[row.key], (row.key, choice)


def _mkdocs_or_skip() -> None:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]'; CI installs it)")


def test_site_builds_strictly_with_the_generated_reference(tmp_path):
    _mkdocs_or_skip()
    site = tmp_path / "site"
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],  # no --quiet: it hides warnings
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = _plain((site / "configuration" / "index.html").read_text())
    missing = [row.key for row in schema_rows() if row.key not in page]
    assert not missing
    for picture in sorted((DOCS / "img").glob("*.png")):
        assert (site / "img" / picture.name).is_file()
    assert (site / "example.ipynb").is_file()
    # the home page is the README, its docs/ links pointing at the pages
    home = (site / "index.html").read_text()
    first_heading = (ROOT / "README.md").read_text().split("\n## ", 2)[1].split("\n", 1)[0]  # "Results"
    assert first_heading in _plain(home) and 'href="robustness/' in home and "docs/robustness.md" not in home
    assert not list(site.rglob("*.py"))  # docs/hooks.py and make_pictures.py are not published


def test_the_home_page_is_the_readme_with_site_links():
    hooks = _hooks()
    assert hooks.README_MARKER in (DOCS / "index.md").read_text()
    home = hooks.readme_markdown()
    assert "](docs/" not in home and "](robustness.md)" in home
    assert home.splitlines()[0] == (ROOT / "README.md").read_text().splitlines()[0]


def test_every_picture_referenced_exists_and_the_pictures_stay_small():
    referenced = set()
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        base = page.parent
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            path = (base / target).resolve()
            assert path.is_file(), (page.name, target)
            referenced.add(path)
    pictures = list((DOCS / "img").glob("*"))
    assert {p.resolve() for p in pictures} <= referenced | {p.resolve() for p in pictures if p.suffix != ".png"}
    assert sum(p.stat().st_size for p in pictures) < 1_000_000


def test_readme_keeps_the_two_commands_and_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith(
        "# Staged transfer learning with PyTorch Lightning\n\n```bash\npip install -e .\n"
        "python train.py stage=finetune\n```\n"
    )
    assert '```bash\npip install -e ".[dev,all]" && python -m pytest -q\n```' in readme
    assert "python -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()
