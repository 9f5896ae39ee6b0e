"""Generated files: the README's algorithm x backend table, docs/parameters.md and the type stub
``src/training_hub/__init__.pyi`` (explicit signatures of ``sft()``, ``osft()``, ... for mypy and pyright).

Run ``python -m training_hub.docs_gen`` after changing a declaration or registering a built-in;
``tests/test_docs.py`` fails while any of them is out of date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from training_hub.config.declare import param_specs
from training_hub.registry import AlgorithmRegistry

TABLE_BEGIN, TABLE_END = "<!-- backends-table:begin -->", "<!-- backends-table:end -->"


def backends_table() -> str:
    """Markdown table of every built-in algorithm, its backends and the default (by preference)."""
    rows = ["| algorithm | backends (preference order: the first that can run here is the default) | function |",
            "|---|---|---|"]
    for algo in AlgorithmRegistry.list_algorithms():
        ordered = AlgorithmRegistry.backend_order(algo)  # the order the default is chosen in
        rows.append(f"| `{algo}` | {', '.join(f'`{n}`' for n in ordered)} | `training_hub.{algo}()` |")
    return "\n".join(rows)


def parameters_markdown() -> str:
    out = ["# Parameter reference", "",
           "Generated from the declarations by `python -m training_hub.docs_gen`; do not edit by hand.",
           "Every parameter is also a `training-hub train ALGO --flag` (dashes or underscores).", ""]
    for algo in AlgorithmRegistry.list_algorithms():
        config_class = getattr(AlgorithmRegistry.get_algorithm(algo), "config_class", None)
        if config_class is None:
            continue
        out += [f"## `{algo}()`", ""]
        group = None
        for spec in param_specs(config_class).values():
            if spec.group != group:
                group = spec.group
                out += ["", f"### {group}", "", "| parameter | type | default | description |", "|---|---|---|---|"]
            default = "**required**" if spec.required else f"`{spec.default!r}`"
            type_name = spec.type_name.replace("|", "\\|")
            out.append(f"| `{spec.name}` | `{type_name}` | {default} | {spec.doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def stub() -> str:
    """``__init__.pyi``: the package's public names, with the convenience functions' signatures written out."""
    from training_hub.stubgen import package_stub

    return package_stub()


def readme_with_table(readme: str) -> str:
    pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
    return pattern.sub(f"{TABLE_BEGIN}\n{backends_table()}\n{TABLE_END}", readme)


def main(root: str = ".") -> int:
    root_path = Path(root)
    readme = root_path / "README.md"
    readme.write_text(readme_with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    (root_path / "docs").mkdir(exist_ok=True)
    (root_path / "docs" / "parameters.md").write_text(parameters_markdown(), encoding="utf-8")
    stub_path = root_path / "src" / "training_hub" / "__init__.pyi"
    stub_path.write_text(stub(), encoding="utf-8")
    print(f"updated {readme}, {root_path / 'docs' / 'parameters.md'} and {stub_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
