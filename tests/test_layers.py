"""The layers hold: the paper's modules import nothing of runtime, batch or orchestration,
and nothing in vct imports the CLI or Prefect (flows call the library, never the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

VCT = Path(__file__).resolve().parents[1] / "vct"
METHOD = {"inversion", "content", "concept", "attention", "fusion", "ddim", "text", "images",
          "config", "errors"}
# "vct.storage" is the package vct/storage/ and each of its modules.
RUNTIME_AND_UP = ("vct.storage", "vct.cache", "vct.manifest", "vct.batch", "vct.report",
                  "vct.artifacts", "vct.sidecar", "vct.translate", "vct.cli", "flows",
                  "prefect", "boto3", "botocore")


# vct/storage/: each module imports only those before it (no cycles), as its docstring says.
STORAGE_ORDER = ("fanout", "env", "errors", "retry", "uris", "s3", "local", "reads", "objects", "cas",
                 "sweep", "sync", "links")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules():
    for path in sorted(VCT.rglob("*.py")):
        yield ".".join(path.relative_to(VCT.parent).with_suffix("").parts), path


def test_the_paper_modules_import_nothing_above_them():
    for name, path in _modules():
        if name.removeprefix("vct.") in METHOD:
            bad = sorted(i for i in _imports(path) if i.startswith(RUNTIME_AND_UP))
            assert not bad, f"{name} (the method) imports {bad}"


def test_nothing_in_the_library_imports_the_cli_or_prefect():
    for name, path in _modules():
        if name == "vct.cli":  # `vct run` starts the flow: the one way down into flows/
            continue
        bad = sorted(i for i in _imports(path)
                     if i.startswith(("vct.cli", "flows", "prefect")) or i == "vct.cli")
        assert not bad, f"{name} imports {bad}"


def test_the_storage_modules_import_only_those_below_them():
    folder = VCT / "storage"
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == \
        sorted(STORAGE_ORDER), "a module was added to or removed from vct/storage/: order it"
    for rank, module in enumerate(STORAGE_ORDER):
        used = {i.split(".")[2] for i in _imports(folder / f"{module}.py")
                if i.startswith("vct.storage.")}
        above = sorted(used - set(STORAGE_ORDER[:rank]))
        assert not above, f"vct.storage.{module} imports {above}, not below it"
