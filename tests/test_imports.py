"""The shape of the code, checked: no import cycle, dependencies one way between layers,
the sandbox out of a production bridge.

The import graph is read from the source with `ast` (every `import` the interpreter can
run, module level or inside a function; `if TYPE_CHECKING:` blocks are type-only and
left out), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BRIDGE = Path(__file__).parent.parent / "bridge"

# Each module's layer. A module may import its own layer and those its layer lists:
# ingress -> policy -> store; delivery -> store, policy, provider; nothing imports
# upward, and ingress and delivery (the two ends of the queue) not each other.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        *("bridge", "errors", "clock", "models", "config", "firewall", "phone", "text"),
        *("pricing", "templates", "health", "loops", "schedule", "sockets", "ranges", "digits"),
        *("digit_regex", "phone_patterns", "phone_automaton", "addresses", "permissions"),
        *("template_limits", "certificates"),
    ),
    "store": ("store",),
    "policy": ("policy",),
    "provider": ("provider",),
    "delivery": ("delivery",),
    "ingress": ("ingress",),
    "ops": ("ops",),
    "root": ("app", "service", "cli", "commands", "__main__"),
}
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "store": {"core", "store"},
    "policy": {"core", "store", "policy"},
    "provider": {"core", "provider"},
    "delivery": {"core", "store", "policy", "provider", "delivery"},
    "ingress": {"core", "store", "policy", "ingress", "ops"},
    "ops": {"core", "store", "ops"},
    "root": set(LAYERS),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in BRIDGE.rglob("*.py"):
        parts = list(path.relative_to(BRIDGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> str | None:
    """The layer of `bridge.x.y`: the longest listed prefix decides."""
    name = module.removeprefix("bridge.") if module != "bridge" else "bridge"
    best: tuple[int, str] | None = None
    for layer, members in LAYERS.items():
        for member in members:
            inside = name == member or name.startswith(member + ".")
            if inside and (best is None or len(member) > best[0]):
                best = (len(member), layer)
    return best[1] if best else None


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_dependencies_point_one_way() -> None:
    graph = import_graph()
    upward = sorted(
        f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) not in ALLOWED[layer_of(source) or "root"]
    )
    assert upward == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    graph = {"bridge.a": {"bridge.b"}, "bridge.b": {"bridge.c"}, "bridge.c": {"bridge.a"}}
    assert cycles(graph) == [["bridge.a", "bridge.b", "bridge.c"]]
    assert layer_of("bridge.ingress.formats.github") == "ingress"
    assert layer_of("bridge.provider.sandbox") == "provider"
    assert "ingress" not in ALLOWED["store"]


@pytest.mark.slow  # a fresh interpreter: what importing the production root loads
def test_the_production_root_does_not_load_the_sandbox() -> None:
    code = (
        "import sys, bridge.app, bridge.service, bridge.cli\n"
        "print('bridge.provider.sandbox' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


# Inside the config package each module imports only those before it here: the shape
# of the config first, the checks on it next, then loading, masking and the live view.
CONFIG_ORDER = (
    *("sections", "parsing", "recipients", "exposure", "validate", "loader", "masking"),
    "live",
)


def test_the_config_package_is_layered_in_its_documented_order() -> None:
    graph = import_graph()
    modules = {f"bridge.config.{name}": rank for rank, name in enumerate(CONFIG_ORDER)}
    assert sorted(m for m in graph if m.startswith("bridge.config.")) == sorted(modules)
    backward = sorted(
        f"{source} imports {target}"
        for source, rank in modules.items()
        for target in graph[source]
        if target in modules and modules[target] >= rank
    )
    assert backward == []


# The sandbox is the oracle the bridge's estimates and parsing are checked against: it
# counts parts, prices and reads numbers from its own tables, so it may not borrow the
# modules it checks (a bug there would then agree with itself).
ORACLE_MAY_NOT_IMPORT = (
    *("bridge.text", "bridge.phone", "bridge.pricing"),
    *("bridge.provider.client", "bridge.provider.responses", "bridge.provider.logmatch"),
)


def test_the_sandbox_borrows_nothing_it_is_an_oracle_for() -> None:
    graph = import_graph()
    sandbox = [m for m in graph if m.startswith("bridge.provider.sandbox")]
    assert "bridge.provider.sandbox.billing" in sandbox  # the package is where we look
    borrowed = sorted(
        f"{source} imports {target}"
        for source in sandbox
        for target in graph[source]
        if target.startswith(ORACLE_MAY_NOT_IMPORT)
    )
    assert borrowed == []


SQL = ("SELECT ", "UPDATE ", "INSERT ", "DELETE ", "WITH ", "CREATE ", "PRAGMA ")


def test_only_the_store_package_speaks_sql() -> None:
    speaking = sorted(
        f"{path.relative_to(BRIDGE.parent)}:{node.lineno}"
        for name, path in _modules().items()
        if not (name == "bridge.store" or name.startswith("bridge.store."))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lstrip().startswith(SQL)  # the code writes SQL keywords in capitals
    )
    assert speaking == []


def _all_imports(tree: ast.AST) -> list[str]:
    """Every module an import statement names (type-only ones too)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_only_the_sqlite_store_imports_sqlite() -> None:
    """Every other module reaches storage through bridge.store's interface, so that a
    second backend (PostgreSQL) changes nothing outside the store."""
    offending = sorted(
        f"{name} imports {target}"
        for name, path in _modules().items()
        if not _inside(name, "bridge.store.sqlite")
        for target in _all_imports(ast.parse(path.read_text(encoding="utf-8")))
        if target.split(".")[0] in ("sqlite3", "sqlite_utils")
    )
    assert offending == []


def test_nothing_outside_the_store_reaches_into_a_backend() -> None:
    """Outside bridge.store only the factory and the interface are known (bridge.store,
    bridge.store.api); the backend's modules are the store's own business."""
    modules = _modules()
    offending = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        if not _inside(name, "bridge.store")
        for target in _all_imports(ast.parse(path.read_text(encoding="utf-8")))
        if target in modules and _inside(target, "bridge.store") and target not in CALLER_VIEW
    )
    assert offending == []


CALLER_VIEW = ("bridge.store", "bridge.store.api")
CONNECTIONS = ("Database", "Connection", "Cursor")


def _annotations(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            args += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            found += [(node.lineno, ast.unparse(a.annotation)) for a in args if a.annotation]
            if node.returns is not None:
                found.append((node.lineno, ast.unparse(node.returns)))
        elif isinstance(node, ast.AnnAssign):
            found.append((node.lineno, ast.unparse(node.annotation)))
    return found


def test_no_connection_is_passed_outside_the_store() -> None:
    """No signature outside bridge.store takes or gives a connection: callers hand the
    store operations, never functions over its database."""
    offending = sorted(
        f"{path.relative_to(BRIDGE.parent)}:{line}: {annotation}"
        for name, path in _modules().items()
        if not _inside(name, "bridge.store")
        for line, annotation in _annotations(ast.parse(path.read_text(encoding="utf-8")))
        if any(word in annotation for word in CONNECTIONS)
    )
    assert offending == []


def test_the_rules_see_a_backend_leak() -> None:
    leak = ast.parse(
        "from sqlite_utils import Database\n"
        "from bridge.store.sqlite import queries\n"
        "def f(db: Database) -> None: ...\n"
    )
    assert [t for t in _all_imports(leak) if t.startswith("sqlite")] == [
        "sqlite_utils",
        "sqlite_utils.Database",
    ]
    assert "bridge.store.sqlite" in _modules() and "bridge.store.sqlite" not in CALLER_VIEW
    assert _annotations(leak) == [(3, "Database"), (3, "None")]


# CPython's regex internals: private, renamed in 3.11 (sre_parse -> re._parser) and their
# node kinds changed between versions. The phone patterns are read by bridge.digit_regex.
PRIVATE_REGEX = ("re._", "sre_parse", "sre_compile", "sre_constants")


def _private_regex_uses(tree: ast.AST) -> list[str]:
    """Imports of the regex internals, `re._x` attribute uses, and their names as text
    (importlib.import_module("re._parser"))."""
    names = _all_imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.append(node.value)
    return [name for name in names if name.startswith(PRIVATE_REGEX)]


def test_no_module_uses_python_private_regex_parser() -> None:
    offending = sorted(
        f"{name}: {use}"
        for name, path in _modules().items()
        for use in _private_regex_uses(ast.parse(path.read_text(encoding="utf-8")))
    )
    assert offending == []


def test_the_rule_sees_each_way_to_reach_the_regex_parser() -> None:
    uses = _private_regex_uses(
        ast.parse(
            "import re._parser as sre_parse\n"
            "from re import _constants\n"
            "import sre_parse\n"
            "import re\n"
            "re._parser.parse('9')\n"
            "importlib.import_module('re._compiler')\n"
            "re.compile('9')\n"
        )
    )
    assert sorted(uses) == [
        "re._compiler",
        "re._constants",
        "re._parser",
        "re._parser",
        "sre_parse",
    ]
