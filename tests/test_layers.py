"""The package's layering: the import-linter contract of pyproject.toml, no import cycles, and
a light `import fastformer.kernels`."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layers_contract_is_kept():
    pytest.importorskip("importlinter")
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 kept, 0 broken" in r.stdout


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("fastformer")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith("fastformer") and importer != "fastformer" and imported != "fastformer":
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                if back:
                    cycles.append((importer, *back))
    assert not cycles, f"import cycles: {cycles}"


def test_kernels_import_light():
    heavy = ("yaml", "tqdm", "safetensors", "tokenizers", "numba")
    code = f"import sys, json, fastformer.kernels; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(r.stdout) == []


def test_public_names_import_from_the_package():
    import fastformer

    for name in fastformer.__all__:
        assert getattr(fastformer, name) is not None
    assert fastformer.TransformerLM.__module__ == "fastformer.models.lm"
    assert issubclass(fastformer.FastformerError, ValueError)
