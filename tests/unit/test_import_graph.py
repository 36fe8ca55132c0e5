"""vmq's import graph, read from the source with ``ast`` (nothing is imported), keeps the architecture:

(a) no import cycle among vmq's modules (module-level imports only: not inside functions, not under
    ``if TYPE_CHECKING:``; a submodule's implied import of its own package does not count);
(b) the core (``CORE``: domain values, pure rules and the use cases written against the ports) never imports
    redis, libvirt, celery or kombu at module level, directly or through other vmq modules (their packages'
    ``__init__`` included);
(c) no module under vmq/ imports the Celery rim (``workers``, ``beat_schedule``), at any level;
(d) no module outside ``vmq.sim`` imports the simulator at module level (``vmq sim``/``vmq demo`` load it
    inside the command functions), and inside functions only from the modules ``SIMULATOR_LOADERS`` names.

The checker is pure functions over ``{module: imports}``; the last tests feed it synthetic graphs to show each
rule can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vmq"

#: The core: domain values, pure rules, and the use cases written against vmq.ports (only adapters and the
#: rim may reach redis, libvirt or Celery).
CORE = ("vmq.model", "vmq.policy", "vmq.codec", "vmq.keys", "vmq.errors", "vmq.ports", "vmq.routing",
        "vmq.telemetry", "vmq.evidence", "vmq.lifecycle", "vmq.judge", "vmq.verdict", "vmq.ingest", "vmq.monitor",
        "vmq.housekeeping", "vmq.operator_restart", "vmq.host_restart", "vmq.inventory", "vmq.hostagent",
        "vmq.operator_views", "vmq.relay", "vmq.relay_answers")
ADAPTER_LIBRARIES = frozenset({"redis", "libvirt", "celery", "kombu"})
RIM = frozenset({"workers", "beat_schedule"})
SIMULATOR = "vmq.sim"

#: (importing module, imported module) pairs rule (c) lets through.
RIM_IMPORTS_ALLOWED: frozenset[tuple[str, str]] = frozenset()

#: The only modules outside vmq.sim that may load the simulator (inside a function, never at module level).
SIMULATOR_LOADERS = frozenset({
    "vmq.cli.sim",  # `vmq sim node|guests`, `vmq demo`
    # with_simulated_agents, only when VMQ_SIM_AGENTS_DIR is set (a simulated host worker on test:///)
    "vmq.hypervisor",
})

#: Module-level cycles rule (a) lets through, each as the set of its modules. None known today.
CYCLES_ALLOWED: frozenset[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class Imports:
    """What one module imports, as absolute module names."""

    module_level: frozenset[str]  # run when the module is imported
    anywhere: frozenset[str]  # module level, inside functions, and under TYPE_CHECKING


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: AbstractSet[str]) -> list[str]:
    """Absolute names ``node`` imports; ``from pkg import sub`` names ``pkg.sub`` when that is a known module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package_parts[:len(package_parts) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        names.append(candidate if candidate in known else base)
    return names


def parse_imports(source: str, module: str, is_package: bool = False, known: AbstractSet[str] = frozenset()) -> Imports:
    """The imports of one module's source; ``known`` are the module names ``from pkg import name`` may mean."""
    tree = ast.parse(source)
    module_level: set[str] = set()
    anywhere: set[str] = set()

    def visit(node: ast.AST, at_module_level: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = _resolve(node, module, is_package, known)
            anywhere.update(names)
            if at_module_level:
                module_level.update(names)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            at_module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_module_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_module_level)

    visit(tree, True)
    anywhere.discard(module)
    module_level.discard(module)
    return Imports(frozenset(module_level), frozenset(anywhere))


def read_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Imports]:
    """Every module under ``root/package`` -> its imports."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        files[".".join(parts)] = (path, is_package)
    known = set(files)
    return {module: parse_imports(path.read_text(encoding="utf-8"), module, is_package, known)
            for module, (path, is_package) in files.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles among ``graph``'s own modules: every strongly connected set of two or more, sorted."""
    edges = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(start: str) -> None:  # Tarjan, iterative: vmq's graph is small but recursion depth is not ours
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(edges):
        if module not in index:
            connect(module)
    return sorted(cycles)


def cycle_violations(graph: Mapping[str, Iterable[str]],
                     allowed: AbstractSet[frozenset[str]] = CYCLES_ALLOWED) -> list[str]:
    """Rule (a): one line per module-level import cycle that is not allowed."""
    return [f"import cycle among {', '.join(cycle)}: move the shared part down or import it inside a function"
            for cycle in find_cycles(graph) if frozenset(cycle) not in allowed]


def core_violations(graph: Mapping[str, Iterable[str]], core: Iterable[str] = CORE,
                    banned: AbstractSet[str] = ADAPTER_LIBRARIES) -> list[str]:
    """Rule (b): one line per core module that reaches a banned library at module level, with the chain."""
    problems = []
    for start in core:
        came_from: dict[str, str | None] = {start: None}
        queue = [start]
        while queue:
            module = queue.pop(0)
            for target in sorted(graph.get(module, ())):
                if _top(target) in banned:
                    chain = [module]
                    while (parent := came_from[chain[-1]]) is not None:
                        chain.append(parent)
                    problems.append(f"{start} imports {_top(target)} at module level via "
                                    f"{' -> '.join(reversed(chain))} -> {target}")
                    continue
                # Importing a.b.c runs a/__init__ and a/b/__init__ first.
                for step in [*_parents(target), target]:
                    if step in graph and step not in came_from:
                        came_from[step] = module
                        queue.append(step)
    return problems


def rim_violations(graph: Mapping[str, Iterable[str]], rim: AbstractSet[str] = RIM,
                   allowed: AbstractSet[tuple[str, str]] = RIM_IMPORTS_ALLOWED) -> list[str]:
    """Rule (c): one line per import of the Celery rim from vmq, at any level, that is not allowed."""
    return [f"{module} imports {target}: vmq must not import the Celery rim (workers/, beat_schedule)"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if _top(target) in rim and (module, target) not in allowed]


def stale_allowances(graph: Mapping[str, Iterable[str]],
                     allowed: AbstractSet[tuple[str, str]] = RIM_IMPORTS_ALLOWED) -> list[str]:
    """Allow-list entries of rule (c) that no longer match an import: delete them."""
    return [f"RIM_IMPORTS_ALLOWED has {module} -> {target}, which is no longer imported: delete the entry"
            for module, target in sorted(allowed) if target not in graph.get(module, ())]


def simulator_violations(graph: Mapping[str, Iterable[str]], simulator: str = SIMULATOR) -> list[str]:
    """Rule (d): one line per module outside the simulator that imports it at module level."""
    def inside(name: str) -> bool:
        return name == simulator or name.startswith(simulator + ".")

    return [f"{module} imports {target} at module level: production code must not load the simulator "
            f"(import it inside the command function)"
            for module, targets in sorted(graph.items()) if not inside(module)
            for target in sorted(targets) if inside(target)]


def simulator_loader_violations(graph: Mapping[str, Iterable[str]], loaders: AbstractSet[str] = SIMULATOR_LOADERS,
                                simulator: str = SIMULATOR) -> list[str]:
    """Rule (d), second half: one line per module outside the simulator and ``loaders`` that imports it at all."""
    def inside(name: str) -> bool:
        return name == simulator or name.startswith(simulator + ".")

    return [f"{module} imports {target}: only {', '.join(sorted(loaders))} may load the simulator"
            for module, targets in sorted(graph.items()) if not inside(module) and module not in loaders
            for target in sorted(targets) if inside(target)]


# ------------------------------------------------------------------------------------------ vmq itself
GRAPH = read_graph()
MODULE_LEVEL = {module: imports.module_level for module, imports in GRAPH.items()}
ANYWHERE = {module: imports.anywhere for module, imports in GRAPH.items()}


def test_the_graph_is_read_from_every_vmq_module() -> None:
    assert set(CORE) <= set(GRAPH)
    assert {"vmq.cli", "vmq.cli.common", "vmq.sim", "vmq.sim.guests", "vmq.store.redis"} <= set(GRAPH)
    assert "vmq.cli.common" in MODULE_LEVEL["vmq.cli.operate"]
    assert "vmq.sim.guests" in ANYWHERE["vmq.cli.sim"] and "vmq.sim.guests" not in MODULE_LEVEL["vmq.cli.sim"]


def test_vmq_has_no_import_cycle_at_module_level() -> None:
    problems = cycle_violations(MODULE_LEVEL)
    assert not problems, "\n".join(problems)


def test_the_core_imports_neither_redis_libvirt_celery_nor_kombu_even_through_other_modules() -> None:
    problems = core_violations(MODULE_LEVEL)
    assert not problems, "\n".join(problems)


def test_no_vmq_module_imports_the_celery_rim_anywhere() -> None:
    problems = rim_violations(ANYWHERE) + stale_allowances(ANYWHERE)
    assert not problems, "\n".join(problems)


def test_only_the_simulator_imports_the_simulator_at_module_level() -> None:
    problems = simulator_violations(MODULE_LEVEL)
    assert not problems, "\n".join(problems)


def test_outside_the_simulator_only_the_named_loaders_import_it_even_inside_functions() -> None:
    problems = simulator_loader_violations(ANYWHERE)
    assert not problems, "\n".join(problems)
    assert "vmq.sim.agents" in ANYWHERE["vmq.hypervisor"] and "vmq.sim.agents" not in MODULE_LEVEL["vmq.hypervisor"]


def test_cli_command_modules_import_only_common_and_the_library() -> None:
    commands = [m for m in GRAPH if m.startswith("vmq.cli.") and m not in {"vmq.cli.common", "vmq.cli.__main__"}]
    assert commands
    problems = [f"{module} imports {target}" for module in commands for target in sorted(ANYWHERE[module])
                if (target == "vmq.cli" or target.startswith("vmq.cli.")) and target != "vmq.cli.common"]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ the checker
def test_a_cycle_is_reported_and_an_allowed_one_is_not() -> None:
    graph = {"vmq.a": {"vmq.b"}, "vmq.b": {"vmq.c"}, "vmq.c": {"vmq.a"}, "vmq.d": {"vmq.a"}}
    assert find_cycles(graph) == [["vmq.a", "vmq.b", "vmq.c"]]
    assert cycle_violations(graph, allowed=frozenset()) == [
        "import cycle among vmq.a, vmq.b, vmq.c: move the shared part down or import it inside a function"]
    assert cycle_violations(graph, allowed={frozenset({"vmq.a", "vmq.b", "vmq.c"})}) == []
    assert find_cycles({"vmq.a": {"vmq.b", "redis"}, "vmq.b": set()}) == []


def test_imports_inside_functions_and_under_type_checking_are_not_module_level() -> None:
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import vmq.b\n"
        "if TYPE_CHECKING:\n    from vmq.c import Thing\nelse:\n    import vmq.e\n"
        "def f() -> None:\n    from workers.app import create_app\n"
        "class K:\n    import vmq.f\n"
    )
    imports = parse_imports(source, "vmq.a")
    assert imports.module_level == {"__future__", "typing", "vmq.b", "vmq.e", "vmq.f"}
    assert imports.anywhere == imports.module_level | {"vmq.c", "workers.app"}
    cyclic = {"vmq.a": parse_imports(source, "vmq.a"), "vmq.c": parse_imports("import vmq.a\n", "vmq.c")}
    assert find_cycles({m: i.module_level for m, i in cyclic.items()}) == []
    assert find_cycles({m: i.anywhere for m, i in cyclic.items()}) == [["vmq.a", "vmq.c"]]


def test_from_package_import_submodule_and_relative_imports_resolve_to_modules() -> None:
    known = {"vmq.cli", "vmq.cli.common", "vmq.cli.sim", "vmq.keys"}
    assert parse_imports("from vmq.cli import sim, main\n", "vmq.cli.__main__", known=known).module_level == {
        "vmq.cli.sim", "vmq.cli"}
    assert parse_imports("from .common import x\nfrom .. import keys\n", "vmq.cli.sim",
                         known=known).module_level == {"vmq.cli.common", "vmq.keys"}
    assert parse_imports("from . import common\n", "vmq.cli", is_package=True, known=known).module_level == {
        "vmq.cli.common"}


def test_a_core_module_reaching_redis_through_another_module_or_a_package_init_is_reported() -> None:
    graph = {"vmq.policy": {"vmq.model", "vmq.helpers.time"}, "vmq.model": {"dataclasses"},
             "vmq.helpers": {"redis.client"}, "vmq.helpers.time": set(), "vmq.codec": {"celery"}}
    assert core_violations(graph, core=["vmq.policy", "vmq.model", "vmq.codec"]) == [
        "vmq.policy imports redis at module level via vmq.policy -> vmq.helpers -> redis.client",
        "vmq.codec imports celery at module level via vmq.codec -> celery",
    ]


def test_a_rim_import_is_reported_unless_allowed_and_a_stale_allowance_is_reported() -> None:
    graph = {"vmq.cli.restart": {"workers.app", "click"}, "vmq.monitor": {"beat_schedule"}}
    assert rim_violations(graph, allowed=frozenset()) == [
        "vmq.cli.restart imports workers.app: vmq must not import the Celery rim (workers/, beat_schedule)",
        "vmq.monitor imports beat_schedule: vmq must not import the Celery rim (workers/, beat_schedule)"]
    assert rim_violations(graph, allowed={("vmq.cli.restart", "workers.app")}) == [
        "vmq.monitor imports beat_schedule: vmq must not import the Celery rim (workers/, beat_schedule)"]
    assert stale_allowances({"vmq.cli.restart": {"vmq.tasks"}}, allowed={("vmq.cli.restart", "workers.app")}) == [
        "RIM_IMPORTS_ALLOWED has vmq.cli.restart -> workers.app, which is no longer imported: delete the entry"]


def test_a_module_level_simulator_import_outside_the_simulator_is_reported() -> None:
    graph = {"vmq.cli.guest": {"vmq.sim.guests"}, "vmq.sim.localcluster": {"vmq.sim.guests"},
             "vmq.simple": {"vmq.model"}, "vmq.sim": set()}
    assert simulator_violations(graph) == [
        ("vmq.cli.guest imports vmq.sim.guests at module level: production code must not load the simulator "
        "(import it inside the command function)")]
    assert simulator_loader_violations({"vmq.cli.guest": {"vmq.sim.guests"}, "vmq.cli.sim": {"vmq.sim.demo"},
                                        "vmq.sim.demo": {"vmq.sim.guests"}}, loaders={"vmq.cli.sim"}) == [
        "vmq.cli.guest imports vmq.sim.guests: only vmq.cli.sim may load the simulator"]
