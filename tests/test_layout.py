"""The house: packages import one way (no circles, no arrow from a lower layer to a higher one), folders stay small,
and every file path that the code, the README and the committed reports cite exists in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mediator_models", "analysis")

# Layers from the bottom up: a module may import its own layer and the ones below, never one above. Within a
# layer, the no-circle test keeps the arrows one way.
LAYERS = [
    ("mediator_models.network",),
    ("mediator_models.storage",),
    ("mediator_models.sampling",),
    ("mediator_models.recording",),
    ("mediator_models.data", "mediator_models.train", "mediator_models.sample", "mediator_models"),
    ("analysis.quality", "analysis.metrics", "analysis.relations"),
    ("analysis.collect", "analysis.schedule", "analysis.plots", "analysis.intervene"),
    ("analysis.study",),
    ("analysis.cli", "analysis"),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer of tests/test_layout.py: add it where it belongs"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every attnmed module `path` imports, at the top or inside functions (lazy imports count: they circle too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_no_import_circles():
    graph = import_graph()
    # A package's __init__ re-exports from below it; importing the package name is not an arrow into a module.
    graph = {name: {target for target in targets if target not in PACKAGES} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_imports_point_down_the_layers():
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(upward))


def test_the_models_never_import_the_analysis():
    graph = import_graph()
    offenders = [
        f"{s} -> {t}"
        for s, ts in graph.items()
        if s.startswith("mediator_models")
        for t in ts
        if t.startswith("analysis")
    ]
    assert not offenders


def test_no_folder_holds_more_than_eight_source_files():
    for package in PACKAGES:
        for folder in [
            ROOT / package,
            *[p for p in (ROOT / package).rglob("*") if p.is_dir() and p.name != "__pycache__"],
        ]:
            files = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(files) <= 8, f"{folder.relative_to(ROOT)} has {len(files)} source files: give it rooms"


CITED_PATH = re.compile(
    r"(?<![\w/.])((?:docs|mediator_models|analysis|benchmarks|scripts|tests|figures|notebooks)/[\w./-]*\w)"
)


def cited_paths(text: str) -> set[str]:
    return {match.rstrip(".") for match in CITED_PATH.findall(text) if "*" not in match}


def citing_files() -> list[Path]:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "figures").rglob("REPORT.md")]
    for package in (*PACKAGES, "benchmarks", "tests", "scripts"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in {".py", ".sh", ".md"}]
    return [file for file in files if file != Path(__file__).resolve()]  # this file spells the patterns out


def test_every_cited_file_is_in_the_repository():
    missing = []
    for file in citing_files():
        for cited in cited_paths(file.read_text()):
            if not (ROOT / cited).exists() and not cited.startswith(("figures/data/", "analysis/quality/assets/")):
                missing.append(f"{file.relative_to(ROOT)} cites {cited}")
    # paths a run creates (figures/data/..., tmp folders in examples) are checked where they are made
    missing = [m for m in missing if "runs/" not in m and "/my-" not in m]
    assert not missing, "citations of files that are not in the repository:\n" + "\n".join(sorted(missing))


def test_citations_name_the_projects_own_documents():
    """The conventions the code cites live in docs/; no citation points at a document a clone does not have."""
    stray = []
    for file in citing_files():
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if re.search(r"(?<!docs/reference\.md )(?<!docs/)\bREFERENCE §|(?<!docs/)\bDESIGN\.md|\bissue \d+\b", line):
                stray.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not stray, "citations a reader of a clone cannot follow:\n" + "\n".join(stray)
