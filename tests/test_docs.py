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


def test_type_stub_is_current():
    from training_hub.docs_gen import stub

    text = (REPO / "src" / "training_hub" / "__init__.pyi").read_text(encoding="utf-8")
    assert text == stub(), "src/training_hub/__init__.pyi is stale: run `python -m training_hub.docs_gen`"


def test_upstream_only_names_come_last_in_docs_and_help(capsys):
    from training_hub.cli import main
    from training_hub.config.declare import UPSTREAM_GROUP

    text = parameters_markdown().split("## `lora_sft()`")[1].split("## `")[0]
    assert text.index(f"### {UPSTREAM_GROUP}") > text.index("### LoRA")
    assert text.index("`micro_batch_size`") > text.index(f"### {UPSTREAM_GROUP}")
    try:
        main(["train", "lora_sft", "--help"])
    except SystemExit:
        pass
    help_text = capsys.readouterr().out
    assert help_text.index(UPSTREAM_GROUP) > help_text.index("--lora-r") > help_text.index("--learning-rate")
    assert help_text.index("--micro-batch-size") > help_text.index(UPSTREAM_GROUP)
