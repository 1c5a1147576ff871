"""The layout rules of the code base, each failing with the list of what breaks it.

* no module of ``sklearn_difffeat/`` above 400 lines;
* no function or method body above 60 lines (docstring excluded) in ``sklearn_difffeat/``, ``benchmarks/`` and
  ``examples/``;
* no import of a private name of one package of the library from another (outside ``tests/``);
* scikit-learn's private modules and names are imported in ``sklearn_difffeat/_sklearn_compat.py`` alone;
* ``ruff check .`` is clean.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sklearn_difffeat"
MAX_MODULE_LINES = 400
MAX_BODY_LINES = 60
BODY_RULE_FOLDERS = (PACKAGE, "benchmarks", "examples")
IMPORT_RULE_FOLDERS = (PACKAGE, "benchmarks", "examples", "tools")


def python_files(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def relative(path):
    return path.relative_to(ROOT).as_posix()


def parse(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def body_lines(function):
    """Lines from the first statement after the docstring to the end of the last statement (0 if none)."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def qualified_functions(tree):
    """(qualified name, node) of every function and method, nested ones included (``Outer.method.inner``)."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


# ---- the package a module belongs to, and the owner of a private name ------------------------------------------
def module_name(path):
    """Dotted name of a file of the package (``sklearn_difffeat/extractors/_base.py`` -> ``...extractors._base``);
    None for scripts outside it."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] != PACKAGE:
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(dotted):
    return (ROOT / Path(*dotted.split(".")) / "__init__.py").is_file()


def package_of(path):
    """The package a file belongs to: ``sklearn_difffeat`` for top-level modules, the subpackage otherwise."""
    name = module_name(path)
    if name is None:
        return None
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def private_owner(dotted):
    """The package that owns the first ``_``-prefixed part of ``dotted`` (None if no part is private).

    The owner of ``a.b._c.d`` is ``a.b`` (the package holding the private module ``_c``); the owner of a private
    name inside a plain module, ``a.b.mod._f``, is ``a.b`` too.
    """
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = parts[:i]
            while owner and not is_package(".".join(owner)):
                owner = owner[:-1]
            return ".".join(owner)
    return None


def imported_paths(node, importer):
    """Dotted paths (module or module.name) an import statement reaches, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = importer.split(".")[: -node.level] if importer else []
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    return [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]


def may_import(importer_package, owner):
    """A private part may be used inside the package that owns it and in that package's subpackages: a
    subpackage may use its parent's private helpers, never a sibling's or a child's."""
    return importer_package is not None and (importer_package == owner or importer_package.startswith(owner + "."))


def private_import_offences(path, tree=None):
    """Each import in ``path`` (parsed, or ``tree`` if given) of a private part it may not use, as a line."""
    importer_package = package_of(path)
    # For relative imports, resolve against the package of an __init__ module, the module itself otherwise.
    importer = module_name(path) or ""
    if path.name == "__init__.py":
        importer += ".__init__"
    offences = []
    for node in ast.walk(tree or parse(path)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for dotted in imported_paths(node, importer):
            if dotted.split(".")[0] != PACKAGE:
                continue
            owner = private_owner(dotted)
            if owner is not None and not may_import(importer_package, owner):
                where = importer_package or "a script outside the package"
                offences.append(f"{relative(path)}:{node.lineno} imports {dotted}, private to {owner} ({where})")
    return offences


def fail_on(offences, rule):
    """Fail with one line per offender (no traceback: the list is the message)."""
    if offences:
        pytest.fail(f"{len(offences)} breach(es) of the rule '{rule}':\n  " + "\n  ".join(offences), pytrace=False)


# ---- the rules ------------------------------------------------------------------------------------------------
def test_no_module_of_the_package_is_longer_than_400_lines():
    offences = []
    for path in python_files(PACKAGE):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            offences.append(f"{relative(path)}: {n} lines")
    fail_on(offences, f"a module of {PACKAGE}/ has at most {MAX_MODULE_LINES} lines")


def test_no_function_body_is_longer_than_60_lines():
    offences = []
    for path in python_files(*BODY_RULE_FOLDERS):
        for name, function in qualified_functions(parse(path)):
            n = body_lines(function)
            if n > MAX_BODY_LINES:
                offences.append(f"{relative(path)}:{function.lineno} {name}: {n} lines")
    fail_on(offences, f"a function body (docstring excluded) has at most {MAX_BODY_LINES} lines")


def test_no_private_name_is_imported_from_another_package():
    offences = [o for path in python_files(*IMPORT_RULE_FOLDERS) for o in private_import_offences(path)]
    fail_on(offences, "no import of another package's private module or name")


SKLEARN_COMPAT = f"{PACKAGE}/_sklearn_compat.py"


def sklearn_private_imports(path, tree=None):
    """Each import in ``path`` of a private scikit-learn module or name (a dotted part starting with ``_``)."""
    offences = []
    for node in ast.walk(tree or parse(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            for dotted in imported_paths(node, ""):
                parts = dotted.split(".")
                if parts[0] == "sklearn" and any(part.startswith("_") for part in parts[1:]):
                    offences.append(f"{relative(path)}:{node.lineno} imports {dotted}")
    return offences


def test_scikit_learn_private_api_is_used_in_one_module_only():
    offences = [o for path in python_files(PACKAGE, "benchmarks", "examples") if relative(path) != SKLEARN_COMPAT
                for o in sklearn_private_imports(path)]
    fail_on(offences, f"scikit-learn's private API is imported in {SKLEARN_COMPAT} alone")


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed in this environment (pip install -e '.[test]' installs it)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"ruff check . found problems:\n{done.stdout}{done.stderr}", pytrace=False)


# ---- the measures themselves, on small known sources ---------------------------------------------------------
def test_body_lines_leaves_out_the_docstring_and_counts_to_the_last_line():
    source = '''
def f(x):
    """Doc
    string."""
    y = x
    return (y,
            y)

def g():
    """Only a docstring."""

class C:
    def m(self):
        def inner():
            pass
        return inner
'''
    found = {name: body_lines(node) for name, node in qualified_functions(ast.parse(source))}
    assert found == {"f": 3, "g": 0, "C.m": 3, "C.m.inner": 1}


@pytest.mark.parametrize("importer, statement, allowed", [
    ("sklearn_difffeat/extractors/image.py", "from ._noise import draw", True),
    ("sklearn_difffeat/extractors/image.py", "from .._sklearn_compat import Interval", True),  # parent's helper
    ("sklearn_difffeat/extraction.py", "from .extractors._base import open_store", False),
    ("sklearn_difffeat/extraction.py", "from .store import FeatureStore", True),
    ("sklearn_difffeat/__main__.py", "from . import _extract_cli", True),
    ("sklearn_difffeat/fusion/__init__.py", "from ._classifier import FusionClassifier", True),
    ("sklearn_difffeat/fusion/_classifier.py", "from ..backbones.mdlm import _rotary_tables", False),
    ("sklearn_difffeat/fusion/_classifier.py", "import sklearn_difffeat.backbones._hub", False),
    ("benchmarks/bench.py", "from sklearn_difffeat.extractors._base import clear_backbone_cache", False),
    ("benchmarks/bench.py", "from sklearn_difffeat.extractors import DiTFeatureExtractor", True),
    ("benchmarks/bench.py", "from sklearn.utils._param_validation import Interval", True),  # not the library
])
def test_the_private_import_rule_on_known_cases(importer, statement, allowed):
    assert (private_import_offences(ROOT / importer, ast.parse(statement)) == []) is allowed


@pytest.mark.parametrize("statement, offends", [
    ("from sklearn.utils._param_validation import Interval", True),
    ("from sklearn.base import _fit_context", True),
    ("import sklearn.model_selection._search", True),
    ("from sklearn.base import BaseEstimator, clone", False),
    ("from .._sklearn_compat import Interval", False),
])
def test_the_scikit_learn_private_import_rule_on_known_cases(statement, offends):
    path = ROOT / PACKAGE / "example.py"
    assert bool(sklearn_private_imports(path, ast.parse(statement))) == offends
