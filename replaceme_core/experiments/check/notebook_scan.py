"""What the notebooks read: a static scan of their code cells for profile accesses, and their parameters cell."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

NOTEBOOKS_DIR = Path(__file__).resolve().parents[3] / "notebooks"

ANY = "*"  # a list element / any value of a mapping


@dataclass(frozen=True)
class ValueOf:
    """A key that is the value found at another profile path (e.g. `wb.profile["eval"][P["suite"]]`)."""

    path: tuple


Step = tuple  # (key: str | ANY | ValueOf, optional: bool)


class NotebookScan(ast.NodeVisitor):
    """Profile accesses in one notebook's code, by name tracking: `wb = Workbench(...)` makes `wb.profile` the root,
    `P = wb.profile["x"]` makes `P` an alias, `for m in P["models"]` makes `m` each element, `x.get("k")` is an
    optional read, and `wb.evaluate(model, suite)` reads `eval[suite]`. Accesses through any other expression are
    not followed (the scan under-reports rather than invents)."""

    WORKBENCH_TYPES = ("Workbench",)
    VISION_TYPES = ("VisionBench",)

    def __init__(self) -> None:
        self.env: dict[str, tuple[Step, ...]] = {}
        self.consts: dict[str, list] = {}
        self.workbenches: set[str] = set()
        self.vision: set[str] = set()
        self.accesses: list[tuple[Step, ...]] = []
        self.guards: list[list[tuple]] = []          # keys tested by enclosing `if` / conditional expressions
        self.implied: dict[str, list[tuple]] = {}    # name -> keys its (conditional) value was tested for

    # --- expressions that denote a place in the profile ---
    def ref(self, node) -> tuple[Step, ...] | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr == "profile" and node.value.id in self.workbenches:
                return ()
            if node.attr == "cfg" and node.value.id in self.vision:
                return (("vision", False),)
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Subscript):
            base = self.ref(node.value)
            keys = self.keys(node.slice)
            if base is not None and len(keys) == 1:
                return base + ((keys[0], False),)
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "get" and node.args:
                base = self.ref(f.value)
                keys = self.keys(node.args[0])
                if base is not None and len(keys) == 1 and isinstance(keys[0], str):
                    return base + ((keys[0], True),)
            if isinstance(f, ast.Name) and f.id in ("dict", "list", "tuple", "sorted") and len(node.args) == 1:
                return self.ref(node.args[0])
        return None

    def keys(self, node) -> list:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                return [node.value]
            if isinstance(node.value, int):
                return [ANY]
            return []
        if isinstance(node, ast.IfExp):
            return self.keys(node.body) + self.keys(node.orelse)
        if isinstance(node, ast.Name) and node.id in self.consts:
            return [c for c in self.consts[node.id] if isinstance(c, str)]
        r = self.ref(node)
        if r is not None:
            return [ValueOf(r)]
        return []

    def is_workbench(self, node) -> bool:
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in self.WORKBENCH_TYPES:
                return True
            if isinstance(f, ast.Attribute) and f.attr in ("with_texts", "with_batches") and self.is_workbench(f.value):
                return True
        if isinstance(node, ast.Name):
            return node.id in self.workbenches
        if isinstance(node, ast.IfExp):
            return self.is_workbench(node.body) or self.is_workbench(node.orelse)
        return False

    def is_vision(self, node) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.VISION_TYPES

    # --- recording ---
    def record(self, steps: tuple[Step, ...]) -> None:
        """An access; a key that an enclosing condition tested for (`if P.get("k")`, `"k" in m`) is optional there."""
        keys = tuple(k for k, _ in steps)
        for guard in (g for level in self.guards for g in level):
            if keys[:len(guard)] == guard:
                i = len(guard) - 1
                steps = steps[:i] + ((steps[i][0], True),) + steps[i + 1:]
        self.accesses.append(steps)

    def tested(self, test) -> list[tuple]:
        """Keys a condition tests for presence: `X.get("k")`, `"k" in X`, or a name assigned under such a test."""
        out = []
        for node in ast.walk(test):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
                base = self.ref(node.func.value)
                if base is not None and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    out.append(tuple(k for k, _ in base) + (node.args[0].value,))
            elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                    and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                base = self.ref(node.comparators[0])
                if base is not None:
                    out.append(tuple(k for k, _ in base) + (node.left.value,))
            elif isinstance(node, ast.Name) and node.id in self.implied:
                out += self.implied[node.id]
        return out

    def visit_IfExp(self, node):
        self.visit(node.test)
        self.guards.append(self.tested(node.test))
        self.visit(node.body)
        self.guards.pop()
        self.visit(node.orelse)

    def visit_If(self, node):
        self.visit(node.test)
        self.guards.append(self.tested(node.test))
        for stmt in node.body:
            self.visit(stmt)
        self.guards.pop()
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Subscript(self, node):
        base = self.ref(node.value)
        if base is not None:
            for k in self.keys(node.slice):
                self.record(base + ((k, False),))
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and node.args:
            base = self.ref(f.value)
            if base is not None:
                for k in self.keys(node.args[0]):
                    if isinstance(k, str):
                        self.record(base + ((k, True),))
        if isinstance(f, ast.Attribute) and f.attr == "evaluate" and self.is_workbench(f.value):
            suite = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "suite"), None)
            keys = ["main"] if suite is None else self.keys(suite)
            for k in keys:
                self.record((("eval", False), (k, False)))
        self.generic_visit(node)

    # --- bindings ---
    def bind(self, target, value) -> None:
        if isinstance(target, ast.Name):
            name = target.id
            self.env.pop(name, None)
            self.consts.pop(name, None)
            self.implied.pop(name, None)
            self.workbenches.discard(name)
            self.vision.discard(name)
            if value is None:
                return
            r = self.ref(value)
            if r is not None:
                self.env[name] = r
            elif self.is_workbench(value):
                self.workbenches.add(name)
            elif self.is_vision(value):
                self.vision.add(name)
            elif isinstance(value, ast.Constant):
                self.consts[name] = [value.value]
            if isinstance(value, ast.IfExp) and self.tested(value.test):
                self.implied[name] = self.tested(value.test)
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) else None
            for i, t in enumerate(target.elts):
                self.bind(t, values[i] if values else None)

    def bind_loop(self, target, iterable) -> None:
        """`for target in iterable`: elements of a profile list/mapping, or constants of a literal tuple."""
        base = self.ref(iterable)
        if base is None and isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Attribute) \
                and iterable.func.attr in ("items", "values", "keys"):
            inner = self.ref(iterable.func.value)
            if inner is not None:
                kind = iterable.func.attr
                if kind == "items" and isinstance(target, ast.Tuple) and len(target.elts) == 2:
                    self.bind(target.elts[0], None)
                    self.bind(target.elts[1], None)
                    if isinstance(target.elts[1], ast.Name):
                        self.env[target.elts[1].id] = inner + ((ANY, False),)
                    return
                if kind == "values" and isinstance(target, ast.Name):
                    self.bind(target, None)
                    self.env[target.id] = inner + ((ANY, False),)
                    return
        if base is not None and isinstance(target, ast.Name):
            self.bind(target, None)
            self.env[target.id] = base + ((ANY, False),)
            return
        self.bind(target, None)
        if isinstance(iterable, (ast.Tuple, ast.List)):  # for mode in ("lt", "full") / for a, b in (("lt", ...), ...)
            if isinstance(target, ast.Name):
                self.consts[target.id] = [e.value for e in iterable.elts if isinstance(e, ast.Constant)]
            elif isinstance(target, ast.Tuple):
                for i, t in enumerate(target.elts):
                    if isinstance(t, ast.Name):
                        self.consts[t.id] = [e.elts[i].value for e in iterable.elts if isinstance(e, ast.Tuple)
                                             and len(e.elts) > i and isinstance(e.elts[i], ast.Constant)]

    def visit_Assign(self, node):
        self.visit(node.value)
        for t in node.targets:
            self.bind(t, node.value)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
            self.bind(node.target, node.value)

    def visit_For(self, node):
        self.visit(node.iter)
        self.bind_loop(node.target, node.iter)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    def _comprehension(self, node, parts):
        for gen in node.generators:
            self.visit(gen.iter)
            self.bind_loop(gen.target, gen.iter)
            for cond in gen.ifs:
                self.visit(cond)
        for part in parts:
            self.visit(part)

    def visit_ListComp(self, node):
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node):
        self._comprehension(node, [node.key, node.value])

    def visit_FunctionDef(self, node):
        for arg in node.args.args + node.args.kwonlyargs:
            ann = arg.annotation
            name = ann.id if isinstance(ann, ast.Name) else (ann.value if isinstance(ann, ast.Constant) else None)
            if name in self.WORKBENCH_TYPES:
                self.workbenches.add(arg.arg)
        for stmt in node.body:
            self.visit(stmt)


def notebook_code(path: Path) -> list[tuple[list[str], str]]:
    """(tags, source) of every code cell; IPython magics and shell lines are blanked so the cell parses."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        src = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())
        out.append((list(cell.get("metadata", {}).get("tags", [])), src))
    return out


def scan_notebook(path: Path) -> list[tuple[Step, ...]]:
    """Every profile access of a notebook, in order (duplicates removed)."""
    scan = NotebookScan()
    for _, src in notebook_code(path):
        scan.visit(ast.parse(src, filename=str(path)))
    return list(dict.fromkeys(scan.accesses))


def dotted(steps: Iterable[Step]) -> str:
    """`eval.<objectives_and_solvers.suite>`, `10_models_and_scale.models[].model`: an access as a reader would write it."""
    out = ""
    for key, _ in steps:
        if key == ANY:
            out += "[]"
        elif isinstance(key, ValueOf):
            out += ".<" + dotted(key.path) + ">"
        else:
            out += ("." if out else "") + str(key)
    return out.lstrip(".")


def _missing(profile: dict, steps: tuple[Step, ...]) -> str | None:
    """The first place where `steps` is required and absent in `profile` (dotted), else None."""
    nodes: list[tuple[Any, str]] = [(profile, "")]
    for key, optional in steps:
        nxt = []
        for node, where in nodes:
            if key == ANY:
                if isinstance(node, list):
                    nxt += [(v, f"{where}[{i}]") for i, v in enumerate(node)]
                elif isinstance(node, dict):
                    nxt += [(v, f"{where}.{k}".lstrip(".")) for k, v in node.items()]
                continue
            if isinstance(key, ValueOf):
                vals = [v for v, _ in _values_at(profile, key.path)]
                keys = [v for v in vals if isinstance(v, str)]
            else:
                keys = [key]
            for k in keys:
                here = f"{where}.{k}".lstrip(".")
                if isinstance(node, dict) and k in node:
                    nxt.append((node[k], here))
                elif not optional:
                    return here
        nodes = nxt
    return None


def _values_at(profile: dict, steps: tuple[Step, ...]) -> list[tuple[Any, str]]:
    nodes: list[tuple[Any, str]] = [(profile, "")]
    for key, _ in steps:
        nxt = []
        for node, where in nodes:
            if key == ANY:
                items = enumerate(node) if isinstance(node, list) else (node.items() if isinstance(node, dict) else [])
                nxt += [(v, f"{where}[{k}]") for k, v in items]
            elif isinstance(key, str) and isinstance(node, dict) and key in node:
                nxt.append((node[key], f"{where}.{key}".lstrip(".")))
        nodes = nxt
    return nodes


def notebook_reads(notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, list[tuple[Step, ...]]]:
    return {p.stem: scan_notebook(p) for p in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))}


def check_parameters_cell(path: Path) -> str | None:
    """papermill injects `profile` and `figures_dir` after the cell tagged `parameters`: it must exist and define both."""
    for tags, src in notebook_code(path):
        if "parameters" in tags:
            names = {t.id for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Assign)
                     for t in node.targets if isinstance(t, ast.Name)}
            lacking = [n for n in ("profile", "figures_dir") if n not in names]
            return f"its `parameters` cell does not define {', '.join(lacking)}" if lacking else None
    return "it has no cell tagged `parameters` (papermill cannot pass the profile)"
