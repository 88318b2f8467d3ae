"""The import layers of ``rellax_fast`` (issue #16), read from the source with ``ast`` (function-level imports
included) rather than from ``sys.modules``, so a lazy import cannot hide an upward one:

- no module imports a command module (``cli.py``, ``cli_*.py``): ``rellax_fast/cli.py`` reaches the commands
  through its ``COMMANDS`` table of module-name strings (``importlib``), and library logic lives elsewhere;
- ``ctr/`` (the DIN) imports neither ``train`` nor ``bench`` (nor ``spa``);
- ``rellax_fast/metrics.py`` is a leaf; ``spa/`` imports neither ``train`` nor ``bench``;
- ``rellax_fast/distributed.py`` is generic: it imports nothing of ``rellax_fast`` but ``_io`` (not ``subr``);
- ``train/`` imports neither ``bench`` nor a command module;
- no compatibility shims (#29 item 2): ``spa.din`` / ``spa.ctr`` are gone, and no module (but a package's
  ``__init__``) imports a name at module level that it neither uses nor lists in ``__all__``;
- no import cycles beyond the ones listed below.

Known exceptions outside this cleanup are listed with their reason; each must still exist, so a fix shows
up here and the list only shrinks.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from rellax_testing import REPO

PACKAGE = Path(REPO) / "rellax_fast"

# (importing module, imported command module): why it is still there
KNOWN_COMMAND_IMPORTS = {
    (
        "rellax_fast.bench.e2e_scoring",
        "rellax_fast.cli",
    ): "bench e2e times the whole `rellax-fast eval` command through its entry point",
}
# import cycles (strongly connected modules) that exist outside this cleanup
KNOWN_CYCLES: set = set()


def package_modules(root: Path = PACKAGE) -> dict:
    """{dotted module name: path} of every .py file under ``root`` (the ``kernels`` link followed)."""
    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                path = Path(dirpath) / f
                parts = list(path.relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join([root.name, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules) -> list:
    """[(imported module, line)] of ``rellax_fast`` modules anywhere in the file; ``from pkg import sub`` names
    the submodule when ``sub`` is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub if sub in modules else module, node.lineno))
    return [(m, line) for m, line in found if m == "rellax_fast" or m.startswith("rellax_fast.")]


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    return modules, {n: imports_of(n, p, modules) for n, p in modules.items()}


def is_command_module(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "cli" or leaf.startswith("cli_")


def violations(edges, importer_prefix: str, forbidden) -> list:
    return [
        f"{n}:{line} imports {m}"
        for n, found in edges.items()
        if n == importer_prefix or n.startswith(importer_prefix + ".")
        for m, line in found
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    ]


def test_the_scan_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "rellax_fast"
    (pkg / "ctr").mkdir(parents=True)
    (pkg / "train").mkdir()
    for p in (
        pkg / "__init__.py",
        pkg / "ctr" / "__init__.py",
        pkg / "train" / "__init__.py",
        pkg / "train" / "cli_x.py",
    ):
        p.write_text("")
    (pkg / "ctr" / "store.py").write_text(
        "def f():\n    from ..train import cli_x\n    import rellax_fast.train\n"
    )
    modules = package_modules(pkg)
    got = imports_of("rellax_fast.ctr.store", modules["rellax_fast.ctr.store"], modules)
    assert got == [("rellax_fast.train.cli_x", 2), ("rellax_fast.train", 3)]
    edges = {"rellax_fast.ctr.store": got}
    assert len(violations(edges, "rellax_fast.ctr", ["rellax_fast.train"])) == 2


def test_no_module_imports_a_command_module(graph):
    _, edges = graph
    seen = {(n, m) for n, found in edges.items() for m, _ in found if is_command_module(m) and m != n}
    unexpected = sorted(seen - set(KNOWN_COMMAND_IMPORTS))
    assert not unexpected, (
        "command modules imported by other modules (move the logic to a library module): "
        + "; ".join(f"{n} imports {m}" for n, m in unexpected)
    )
    gone = sorted(set(KNOWN_COMMAND_IMPORTS) - seen)
    assert not gone, f"fixed, remove from KNOWN_COMMAND_IMPORTS: {gone}"


def test_command_table_names_its_modules_by_string(graph):
    from rellax_fast.cli import COMMANDS

    modules, _ = graph
    for command, (module, _help) in COMMANDS.items():
        assert module in modules, f"`{command}`: {module} does not exist"
        tree = ast.parse(modules[module].read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"{module} lacks add_arguments/run"
        assert is_command_module(module), f"`{command}` is wired to {module}, which is not named cli*.py"


def test_ctr_imports_neither_train_nor_bench(graph):
    _, edges = graph
    bad = violations(edges, "rellax_fast.ctr", ["rellax_fast.train", "rellax_fast.bench", "rellax_fast.spa"])
    assert not bad, bad


def test_metrics_is_a_leaf(graph):
    _, edges = graph
    assert edges["rellax_fast.metrics"] == [], edges["rellax_fast.metrics"]


def test_spa_imports_neither_train_nor_bench(graph):
    _, edges = graph
    bad = violations(edges, "rellax_fast.spa", ["rellax_fast.train", "rellax_fast.bench"])
    assert not bad, bad


def test_distributed_is_generic(graph):
    # #29 item 3: distributed.py knew SUBR (its embedding step imported subr.cache); that step is subr.embed's
    _, edges = graph
    assert {m for m, _ in edges["rellax_fast.distributed"]} <= {"rellax_fast._io"}, edges[
        "rellax_fast.distributed"
    ]


def test_one_flock_helper():
    # #29: data.ctr's folder lock and backbones' conversion lock were twins; _io.file_lock is the one left
    users = sorted(
        module
        for module, path in package_modules().items()
        if any(
            isinstance(n, ast.Attribute) and n.attr == "flock" for n in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == ["rellax_fast._io"], f"lock through rellax_fast._io.file_lock instead: {users}"


def test_train_imports_no_bench(graph):
    _, edges = graph
    bad = violations(edges, "rellax_fast.train", ["rellax_fast.bench", "rellax_fast.cli"])
    assert not bad, bad


def test_no_import_cycles_but_the_known_ones(graph):
    modules, edges = graph
    adjacency = {n: {m for m, _ in found if m in modules and m != n} for n, found in edges.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.add(frozenset(component))

    for v in sorted(adjacency):
        if v not in index:
            visit(v)
    assert not cycles - KNOWN_CYCLES, f"new import cycles: {[sorted(c) for c in cycles - KNOWN_CYCLES]}"
    assert not KNOWN_CYCLES - cycles, (
        f"fixed, remove from KNOWN_CYCLES: {[sorted(c) for c in KNOWN_CYCLES - cycles]}"
    )


def unused_imports(path: Path) -> list:
    """Names imported at module level that the module neither uses nor lists in ``__all__``: re-exports."""
    tree = ast.parse(path.read_text())
    imported = {
        a.asname or a.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for a in node.names
    } - {"annotations"}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    listed = {
        e.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        for e in ast.walk(node.value)
        if isinstance(e, ast.Constant)
    }
    return sorted(imported - used - listed)


def test_no_compatibility_shims():
    modules = package_modules()
    assert not {"rellax_fast.spa.din", "rellax_fast.spa.ctr"} & set(modules), (
        "import rellax_fast.ctr.din / ctr.store"
    )
    shims = {m: names for m, p in modules.items() if p.name != "__init__.py" and (names := unused_imports(p))}
    assert not shims, f"re-exported names (import them from their home module instead): {shims}"


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists the packages by name: a new one (e.g. ``ctr``) missing there would be left out of wheels."""
    import tomllib

    listed = set(tomllib.loads((Path(REPO) / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk - {"rellax_fast.kernels"} <= listed, sorted(on_disk - listed)


# facts with one home (#29 item 3): each of these names is assigned at module level in exactly one module;
# everywhere else imports it
SINGLE_HOMES = {
    "DATASETS": "rellax_fast.data.names",
    "BACKEND_CHOICES": "rellax_fast.ops._backend",
    "BACKENDS": "rellax_fast.ops._backend",
    "INTERACTIONS": "rellax_fast.cflora.interaction",
    "SUITE_HELP": "rellax_fast.bench.cli",  # the bench suites: subcommands, help texts, the protocol table
    "FLAT_ADAPTER_KEYS": "rellax_fast.train.runs",  # the old runs' flat adapter keys: read by the converter only
    "RELLAX_CFLORA_DEFAULTS": "rellax_fast.train.model",
}


def assignments_of(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_single_homes_are_assigned_once():
    homes = {name: [] for name in SINGLE_HOMES}
    for module, path in package_modules().items():
        for name in assignments_of(path) & set(SINGLE_HOMES):
            homes[name].append(module)
    assert homes == {name: [home] for name, home in SINGLE_HOMES.items()}, homes


def test_interaction_flag_accepts_a_kind_registered_after_import():
    # --interaction reads the live registry (it used to check a tuple frozen at import)
    import argparse

    from rellax_fast.cflora.interaction import INTERACTIONS, StaticInteraction
    from rellax_fast.train.args import interaction_kind

    with pytest.raises(argparse.ArgumentTypeError, match="invalid choice: 'late-kind'"):
        interaction_kind("late-kind")
    INTERACTIONS["late-kind"] = StaticInteraction
    try:
        assert interaction_kind("late-kind") == "late-kind"
    finally:
        del INTERACTIONS["late-kind"]


def test_dataset_names_are_a_standard_library_leaf():
    # the one list of dataset names (cli.py offers them as --dataset choices without importing a reader)
    from rellax_fast.cli import DATASETS as command_choices
    from rellax_fast.data.names import DATASETS

    tree = ast.parse((PACKAGE / "data" / "names.py").read_text())
    imported = {
        a.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for a in node.names
    }
    assert imported <= {"__future__"}, imported
    assert command_choices is DATASETS


def test_the_backend_choices_are_the_routing_table_s():
    from rellax_fast.cflora import model as cflora_model
    from rellax_fast.ops import _backend

    assert cflora_model.BACKEND_CHOICES is _backend.BACKEND_CHOICES
    assert set(_backend.BACKENDS) <= set(_backend.BACKEND_CHOICES)


def _string_texts(node):
    """(line, text) of every string literal under ``node`` (an f-string's literal parts joined)."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.lineno, n.value
        elif isinstance(n, ast.JoinedStr):
            yield n.lineno, "".join(v.value for v in n.values if isinstance(v, ast.Constant))


def test_command_help_texts_do_not_list_the_interaction_kinds():
    # the kinds live in the registry (cflora.interaction.INTERACTIONS; `rellax-fast info` prints it): a help
    # text that lists them (3 or more in one literal) goes stale when a kind is registered
    import re

    from rellax_fast.cflora.interaction import INTERACTION_KINDS

    found = []
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        scopes = (
            [tree]
            if is_command_module(module)
            else [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and "argument" in f.name]
        )
        for scope in scopes:
            for line, text in _string_texts(scope):
                named = [k for k in INTERACTION_KINDS if re.search(rf"\b{re.escape(k)}\b", text)]
                if len(named) >= 3:
                    found.append(f"{module}:{line} names {named}")
    assert not found, found


def test_info_and_the_demo_variants_read_the_live_interaction_registry():
    from rellax_fast.cflora.interaction import INTERACTIONS, StaticInteraction
    from rellax_fast.cli import info_lines
    from rellax_fast.train.ablation import selected_variants

    class LateKind(StaticInteraction):
        kind = "late-kind"
        ablation_name = "late kind C"

    with pytest.raises(ValueError, match=r"unknown \['late-kind'\]"):
        selected_variants("late-kind")
    INTERACTIONS["late-kind"] = LateKind
    try:
        line = next(x for x in info_lines() if x.startswith("interactions"))
        assert line.split(" (")[0].split(None, 1)[1].split(", ") == list(INTERACTIONS)
        assert "late-kind" in line
        (spec,) = selected_variants("late-kind")
        assert (spec.name, spec.interaction) == ("late kind C", "late-kind")
        assert "late kind C" in [s.name for s in selected_variants("all")]
    finally:
        del INTERACTIONS["late-kind"]
