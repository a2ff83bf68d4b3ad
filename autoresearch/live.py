"""
The live check: before the number is printed, what runs in memory must be what the
fingerprinted files say. DO NOT MODIFY.

verify_data() fingerprints the fixed files at start-up: constants.py, prepare.py and
this package. At the summary, for each of them whose module is loaded:

- the file still has those bytes, and its module was loaded from it;
- every function and class it defines at top level is still the one compiled from
  those bytes: the code object of each function and method (compared with a fresh
  compile), its module's globals, its literal defaults;
- every UPPER_CASE constant still has the value the file gives it: constants.py is
  run again from its bytes (its rules depend on the smoke switch), the literals of
  the other files are read from their source;
- every name it imports from another fixed module is still that module's object.

A change stops the run with one line naming the object (`prepare.evaluate_bpb`,
`constants.TIME_BUDGET`). So the guards check themselves too: this module, the
ledger and report.py are fixed files. A tripwire against an eager edit, not a
sandbox: code that replaces the check itself, or writes the ledger, is not caught.

report.print_summary calls it; it imports autoresearch.ledger and autoresearch.manifest
(the list of fixed files), and finds constants, prepare and the package in sys.modules:
it imports neither prepare.py nor train.py.
"""

import ast
import hashlib
import inspect
import os
import sys
import types

from autoresearch import manifest
from autoresearch.ledger import Failed

_MISSING = object()


def check_live(recorded):
    """Compare every loaded fixed module with its file; recorded: {file: short sha256}, as
    verify_data returned them. Returns constants.py's rules as its bytes give them."""
    rules = {}
    modules = {_module_name(file): file for file in manifest.harness_files()}
    for name, file in modules.items():  # constants.py first: the others' copies are compared with it
        module = sys.modules.get(name)
        if module is None:
            continue
        source = _source(file, module, recorded)
        code = compile(source, module.__file__, "exec", dont_inherit=True)
        if file == "constants.py":
            rules = _check_rules(module, code)
        _check_module(module, file, ast.parse(source), code, set(modules))
    return rules


def _module_name(file):
    return file[:-len(".py")].replace("/", ".")


def _source(file, module, recorded):
    """The file's bytes, when they are the ones verify_data fingerprinted and the module came from them."""
    path = os.path.join(manifest.HARNESS_DIR, file)
    if os.path.realpath(getattr(module, "__file__", "") or "") != os.path.realpath(path):
        raise Failed(f"{module.__name__} was loaded from {getattr(module, '__file__', None)}, not from the fixed "
                     f"{path}")
    with open(path, "rb") as f:
        source = f.read()
    if hashlib.sha256(source).hexdigest()[:12] != recorded.get(file):
        raise Failed(f"{file} changed on disk during the run: restore it (git checkout {file}) and run again")
    return source


def _check_rules(module, code):
    """constants.py run again from its bytes: every UPPER_CASE name must have that value in memory."""
    fresh = {"__name__": module.__name__, "__file__": module.__file__}
    exec(code, fresh)
    rules = {name: value for name, value in fresh.items() if name.isupper()}
    for name, value in rules.items():
        live = getattr(module, name, _MISSING)
        if not _same(live, value):
            raise Failed(f"constants.{name} is {_shown(live)} in memory, but constants.py makes it {value!r}: "
                         f"the rules are fixed (an edit changed them at run time)")
    return rules


def _same(a, b):
    return a is b or (type(a) is type(b) and a == b)


def _shown(value):
    return "missing" if value is _MISSING else repr(value)

# =============================================================================
# One module against its source
# =============================================================================


def _check_module(module, file, tree, code, fixed):
    codes = _code_objects(code)
    bound = _bindings(tree)
    assigned_elsewhere = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    once = {name for name, count in bound.items() if count == 1 and name not in assigned_elsewhere}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in once:
            _check_function(module, file, node.name, getattr(module, node.name, _MISSING), codes, node)
        elif isinstance(node, ast.ClassDef) and node.name in once:
            _check_class(module, file, node, codes)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for name, value in _literal_assignments(node):
                live = getattr(module, name, _MISSING)
                if name.isupper() and name in once and not _same(live, value):
                    raise Failed(f"{module.__name__}.{name} is {_shown(live)} in memory, but {file} makes it "
                                 f"{value!r}: the fixed files' constants are fixed")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module in fixed or
                                                                        node.module == "autoresearch"):
            for alias in node.names:
                local = alias.asname or alias.name
                source = sys.modules.get(node.module)
                expected = getattr(source, alias.name, sys.modules.get(f"{node.module}.{alias.name}", _MISSING))
                live = getattr(module, local, _MISSING)
                if local in once and expected is not _MISSING and not _same(live, expected):
                    raise Failed(f"{module.__name__}.{local} is not {node.module}.{alias.name}: it was replaced "
                                 f"at run time, and the fixed files are fixed")


def _check_function(module, file, qualname, live, codes, node):
    """A function (or method) against the code compiled from its source."""
    function = _unwrap(live)
    where = f"{module.__name__}.{qualname}"
    if function is None:
        if node.decorator_list:
            return  # a library's wrapper (a custom op) that does not say what it wraps
        raise Failed(f"{where} is not the function {file} defines: it was replaced at run time (the fixed files "
                     f"are fixed)")
    expected = codes.get(qualname)
    if expected is not None and (function.__code__ != expected or function.__globals__ is not vars(module)):
        raise Failed(f"{where} is not the function {file} defines: it was replaced or changed at run time (the "
                     f"fixed files are fixed)")
    defaults = _literal_defaults(node)
    if defaults is not None and defaults != (function.__defaults__ or (), function.__kwdefaults__ or {}):
        raise Failed(f"{where}'s default arguments are not the ones {file} gives it: they were changed at run time")


def _check_class(module, file, node, codes):
    cls = getattr(module, node.name, _MISSING)
    where = f"{module.__name__}.{node.name}"
    if not isinstance(cls, type) or cls.__module__ != module.__name__ or cls.__qualname__ != node.name:
        raise Failed(f"{where} is not the class {file} defines: it was replaced at run time")
    methods = [item for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for item in methods:
        if sum(other.name == item.name for other in methods) == 1:
            _check_function(module, file, f"{node.name}.{item.name}", vars(cls).get(item.name, _MISSING), codes,
                            item)


def _unwrap(obj):
    """The plain function behind obj (a decorator's __wrapped__, a classmethod's or
    staticmethod's __func__, a property's getter), or None."""
    for _ in range(10):
        inner = getattr(obj, "__wrapped__", None) or getattr(obj, "__func__", None) or getattr(obj, "fget", None)
        if inner is None:
            return obj if isinstance(obj, types.FunctionType) else None
        obj = inner
    return None


def _code_objects(code, prefix=""):
    """{qualified name: code object} of every function and class body compiled into code."""
    found = {}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            name = prefix + const.co_name
            found.setdefault(name, const)
            inner = ".<locals>." if const.co_flags & inspect.CO_NEWLOCALS else "."
            for key, value in _code_objects(const, name + inner).items():
                found.setdefault(key, value)
    return found


def _bindings(tree):
    """How many times each name is bound at the module's top level (in if/try/with blocks too,
    not inside functions or classes)."""
    counts = {}

    def bind(name):
        counts[name] = counts.get(name, 0) + 1

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(node.name)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bind(alias.asname or alias.name.split(".")[0])
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bind(node.id)
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return counts


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _literal_assignments(node):
    """(name, value) for each name a top-level assignment binds to a literal."""
    targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
    if node.value is None:
        return
    for target in targets:
        if isinstance(target, ast.Name):
            pairs = [(target, node.value)]
        elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) \
                and len(target.elts) == len(node.value.elts):
            pairs = list(zip(target.elts, node.value.elts))
        else:
            continue
        for name, value in pairs:
            value = _literal(value)
            if isinstance(name, ast.Name) and value is not _MISSING:
                yield name.id, value


def _literal_defaults(node):
    """(positional defaults, keyword-only defaults) when all are literals, else None."""
    args = node.args
    positional = tuple(_literal(d) for d in args.defaults)
    keyword = {a.arg: _literal(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    if any(v is _MISSING for v in (*positional, *keyword.values())):
        return None
    return positional, keyword
