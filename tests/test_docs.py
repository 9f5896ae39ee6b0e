"""Generated docs stay in step with the registry and the declarations."""

from __future__ import annotations

from conftest import REPO
from training_hub.docs_gen import TABLE_BEGIN, TABLE_END, backends_table, parameters_markdown


def test_readme_table_matches_registry():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert TABLE_BEGIN in readme and TABLE_END in readme
    current = readme.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip()
    assert current == backends_table(), "README table is stale: run `python -m training_hub.docs_gen`"


def test_parameter_reference_is_current():
    text = (REPO / "docs" / "parameters.md").read_text(encoding="utf-8")
    assert text == parameters_markdown(), "docs/parameters.md is stale: run `python -m training_hub.docs_gen`"
