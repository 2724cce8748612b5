"""The package layering (issue 9): the network (nanoseek.model) imports nothing above it, and no import circle
is kept alive by imports inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nanoseek"
ABOVE_MODEL = ("nanoseek.lora", "nanoseek.lora_io", "nanoseek.checkpoint", "nanoseek.mup", "nanoseek.modeling",
               "nanoseek.train", "nanoseek.serve", "nanoseek.data")


def _imported_after(statement: str) -> set[str]:
    """nanoseek modules in sys.modules after `statement` in a fresh interpreter."""
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('nanoseek')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    return set(out.split())


def test_importing_the_model_imports_nothing_above_it():
    loaded = _imported_after("import nanoseek.model; nanoseek.model.CausalLM")
    assert "nanoseek.model.transformer" in loaded and "nanoseek.model.linear" in loaded
    above = sorted(m for m in loaded if any(m == a or m.startswith(a + ".") for a in ABOVE_MODEL))
    assert above == [], f"importing nanoseek.model imported {above}"


def test_public_api_still_loads():
    loaded = _imported_after("from nanoseek import Model, LoraConfig, configure_optimizer")
    assert {"nanoseek.modeling", "nanoseek.lora", "nanoseek.checkpoint"} <= loaded


def _function_level_nanoseek_imports(path: Path) -> list[str]:
    """`from .x import y` / `import nanoseek...` statements inside a function body of `path`."""
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("nanoseek")):
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} from {'.' * node.level}{node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("nanoseek") for a in node.names):
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} import")
    return found


# cli.py loads each command's room when that command runs: `nanoseek --help` and `nanoseek info` must not import
# torch-heavy rooms or the serving stack (fastapi, uvicorn are optional). That is startup cost, not a circle.
LAZY_BY_DESIGN = ("cli.py",)


def test_no_function_level_imports_of_nanoseek_modules():
    """Every nanoseek-internal import is at module level: none hides a circle. (Imports of optional third-party
    packages inside functions, e.g. matplotlib, are fine: they are not circles.)"""
    found = [hit for p in sorted(PKG.rglob("*.py")) if str(p.relative_to(PKG)) not in LAZY_BY_DESIGN
             for hit in _function_level_nanoseek_imports(p)]
    assert found == [], "\n".join(found)
