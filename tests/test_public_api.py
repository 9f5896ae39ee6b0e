"""The public API as type checkers and maintainers see it: typed signatures, layers, function sizes."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).parent / "typing_samples"
PACKAGE = ROOT / "src" / "training_hub"
# Third-party packages mypy need not read to check a user's calls (keeps the check at about a second).
SKIP = ("torch transformers trl peft datasets accelerate instructlab mini_trainer tokenizers safetensors numpy yaml "
        "tqdm matplotlib mlflow wandb tensorboard pandas pyarrow huggingface_hub").split()


def run_mypy(tmp_path: Path, *scripts: Path) -> str:
    pytest.importorskip("mypy")
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\n"
                      f"[mypy-{','.join(name + '.*' for name in SKIP)}]\nfollow_imports = skip\n")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                             str(tmp_path / "cache"), "--no-error-summary", *map(str, scripts)],
                            capture_output=True, text=True, cwd=tmp_path)
    return result.stdout + result.stderr


def test_mypy_accepts_a_correct_script(tmp_path):
    assert run_mypy(tmp_path, SAMPLES / "correct.py").strip() == ""


def test_mypy_flags_misspelt_and_mistyped_parameters(tmp_path):
    output = run_mypy(tmp_path, SAMPLES / "mistakes.py")
    expected = {i: m.group(1) for i, line in enumerate((SAMPLES / "mistakes.py").read_text().splitlines(), 1)
                if (m := re.search(r"# error: ([\w-]+)", line))}
    found = {int(m.group(1)): m.group(2) for m in re.finditer(r"mistakes\.py:(\d+): error: .*\[([\w-]+)\]", output)}
    assert found == expected, output
    assert 'did you mean "num_epochs"' in output


def test_package_ships_its_type_information():
    assert (PACKAGE / "py.typed").is_file() and (PACKAGE / "__init__.pyi").is_file()
    import training_hub

    stub = (PACKAGE / "__init__.pyi").read_text()
    exported = set(training_hub.__all__) | {"__version__"}
    declared = set(re.findall(r"\b(\w+) as \1\b", stub)) | set(re.findall(r"^def (\w+)\(", stub, re.M)) | {"__version__"}
    assert exported == declared  # the stub declares exactly the public names


def test_layering_contract():
    """registry/config/data below engine, engine below backends, backends below algorithms, cli on top
    (pyproject.toml [tool.importlinter]; function-level imports count)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or pytest.skip("import-linter")
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:]


def test_no_function_in_the_engine_or_algorithms_is_longer_than_80_lines():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for folder in ("engine", "algorithms") for path in sorted((PACKAGE / folder).rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long
