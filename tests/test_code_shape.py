"""The shape the code keeps: short functions (ruff checks complexity and line length; this, length), and
imports that run one way: no cycle, and the layers below never reaching up."""

import ast
import graphlib
import importlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def test_no_function_in_src_is_longer_than_80_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_no_module_in_src_is_longer_than_400_lines():
    long = [f"{path.relative_to(SRC)} ({n} lines)" for path in sorted(SRC.rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, "modules over 400 lines: " + ", ".join(long)


# a package may not import from the packages named here (model < data < teacher < feed; data < training)
LAYERS_BELOW = {
    "model": {"data", "training", "teacher", "feed"},
    "data": {"training", "teacher", "feed"},
    "teacher": {"training", "feed"},
    "training": {"teacher", "feed"},
}


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    """Each module of ``scratchlm`` → the modules of ``scratchlm`` it imports, at the top or inside a
    function (a deferred import is still a dependency); and the imports of ``scratchlm`` names that no module
    answers (a deferred import left behind by a move fails only when its function runs)."""
    root = SRC / "scratchlm"
    modules = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}
    graph, unresolved = {}, set()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{target}.{a.name}" in modules:  # a submodule
                        found.add(f"{target}.{a.name}")
                        continue
                    found.add(target)
                    if target in modules and not hasattr(importlib.import_module(target), a.name):
                        unresolved.add(f"{name} -> {target}.{a.name}")  # what the package does not export
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules} - {name}
        unresolved |= {f"{name} -> {m}" for m in found if m.startswith("scratchlm") and m not in modules}
    return graph, unresolved


def test_imports_resolve_have_no_cycle_and_respect_the_layers():
    graph, unresolved = import_graph()
    assert not unresolved, "imports of modules that do not exist: " + ", ".join(sorted(unresolved))
    assert len(graph) > 50 and graph["scratchlm.training.trainer"], "the walk found the package's imports"
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if d.split(".")[1:2] and m.split(".")[1:2]
              and d.split(".")[1] in LAYERS_BELOW.get(m.split(".")[1], ())]
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


# each data and sampling setting: the one settings class that declares it
DECLARED_IN = {**dict.fromkeys(("chunk_chars", "eval_fraction", "text_field"), "CorpusReading"),
               **dict.fromkeys(("max_new_tokens", "temperature", "top_k", "top_p"), "Sampling")}


def _settings_classes() -> list[type]:
    """Every settings class of the package (a ``ConfigBase``), its modules all imported."""
    import pkgutil

    import scratchlm
    from scratchlm.config import ConfigBase

    for module in pkgutil.walk_packages(scratchlm.__path__, "scratchlm."):
        if not module.name.endswith("__main__"):  # the console script: it runs when imported
            importlib.import_module(module.name)
    found, todo = [], [ConfigBase]
    while todo:
        found.append(cls := todo.pop())
        todo += cls.__subclasses__()
    return found


def test_each_data_and_sampling_setting_is_declared_once():
    """A setting's name, type and default in one class, which every command's config includes
    (``CorpusReading``, ``Sampling``; the feed's --teacher-* are Sampling's, made by ``prefixed``): no copies
    whose defaults could drift apart."""
    from scratchlm.config import Prefixed

    classes = _settings_classes()
    found = {name: sorted(c.__name__ for c in classes if name in c.__dict__.get("__annotations__", {}))
             for name in DECLARED_IN}
    assert found == {name: [owner] for name, owner in DECLARED_IN.items()}
    teacher = {c.__name__ for c in classes
               if any(n.startswith("teacher_") and n.removeprefix("teacher_") in DECLARED_IN
                      for n in c.__dict__.get("__annotations__", {}))}
    assert all(issubclass(c, Prefixed) for c in classes if c.__name__ in teacher), teacher
    from scratchlm.feed.server import ServeConfig
    from scratchlm.teacher.settings import Sampling

    assert ServeConfig().teacher_temperature == Sampling().temperature  # one default, whoever includes it


# What a default of a setting may be written again as without being one: nothing is set (None, False, 0,
# ""), or "decide for me" ("auto").
EMPTY = (None, False, 0, 0.0, "", "auto")
# Classes whose fields are values of their own that may equal another setting's default, and why.
OWN_VALUES = {"DemoPlan": "the demo's plan: sizes chosen and measured for it (bench/RESULTS.md)"}


def _declared_defaults() -> dict[str, dict[object, set[str]]]:
    """Every setting a settings class declares: its name → its default (non-empty) → the classes declaring it
    with that default."""
    found: dict[str, dict[object, set[str]]] = {}
    for cls in _settings_classes():
        own = cls.__dict__.get("__annotations__", {})
        for name, field in getattr(cls, "model_fields", {}).items():
            default = field.default
            if name in own and isinstance(default, (int, float, str)) and default not in EMPTY:
                found.setdefault(name, {}).setdefault(default, set()).add(cls.__name__)
    return found


def _written_defaults(tree: ast.AST):
    """(line, name, value, where) of every literal given as a parameter's default, a class field's value or
    a call's keyword, anywhere in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                yield default.lineno, arg.arg, default, f"a default of {node.name}()"
        elif isinstance(node, ast.ClassDef) and node.name not in OWN_VALUES:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value:
                    yield item.lineno, item.target.id, item.value, f"a field of {node.name}"
        elif isinstance(node, ast.Call):
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
            for keyword in node.keywords:
                if keyword.arg:
                    yield keyword.lineno, keyword.arg, keyword.value, f"a keyword of {called}()"


def test_no_default_of_a_declared_setting_is_written_again():
    """A setting's default lives in the settings class that declares it: a function, a dataclass or a call
    that wrote the same value again (``chunk_chars=8000``, ``seed: int = 1337``) would keep its copy when the
    declaration changes. Parts take the settings object they need (``CorpusReading``, ``FeedReading``, ...)
    or are given every value by the command that holds them."""
    declared, copies = _declared_defaults(), []
    for path in sorted(SRC.rglob("*.py")):
        for line, name, value, where in _written_defaults(ast.parse(path.read_text(encoding="utf-8"))):
            if name in declared and isinstance(value, ast.Constant) and value.value in declared[name]:
                owners = declared[name][value.value]
                # the declaring class's own field, and a call building that class (a preset): not copies
                if not any(where in (f"a field of {o}", f"a keyword of {o}()") for o in owners):
                    copies.append(f"{path.relative_to(SRC)}:{line} {name}={value.value!r} ({where}; "
                                  f"declared in {', '.join(sorted(owners))})")
    assert not copies, "defaults written again: " + "; ".join(copies)
    assert {"chunk_chars", "eval_fraction", "text_field", "seed", "feed_texts_per_request"} <= set(declared)
