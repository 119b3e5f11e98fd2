"""The default corpus of fastformer.data, built from the standard library's documentation.

For a fixed list of modules: the module docstring and then, for each public class and function
in name order, a `name(signature)` line followed by its docstring -- roughly what `help(module)`
shows. Signature defaults other than literals are written `...`: their reprs may hold memory
addresses or program state. This file imports nothing outside the standard library, so that
`fastformer.data.default_corpus` can run it as a script in a fresh interpreter
(`python -I -S stdlib_corpus.py` writes the corpus to stdout as UTF-8): libraries loaded in the
calling process may have patched the standard library, and the corpus must not change with them.
"""

import importlib
import inspect
import io
import sys
import warnings

# Modules whose documentation makes the default corpus: pure-Python, importable everywhere,
# free of import-time side effects, and documented at length.
CORPUS_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "logging.handlers", "mailbox", "math", "mimetypes", "numbers", "operator",
    "optparse", "os", "os.path", "pathlib", "pdb", "pprint", "queue", "random", "re", "reprlib",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.etree.ElementTree", "zipfile",
)


class _Elided:
    """Stands for a default value left out of a signature."""

    def __repr__(self):
        return "..."


def _is_literal(value):
    """True for a value whose repr is the same in every process: None, bools, numbers, strings,
    bytes, and tuples or lists of them (not sets: their order follows the string hash seed)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_literal(v) for v in value)


def _signature(obj):
    """The signature as text, defaults other than literals shown as `...`: the repr of an object
    default may hold a memory address (`<object object at 0x7f...>`) or program state (the
    handler list of `logging.shutdown`), and the corpus must be the same in every process."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p if p.default is p.empty or _is_literal(p.default) else p.replace(default=_Elided())
              for p in sig.parameters.values()]
    return str(sig.replace(parameters=params))


def _document(name, obj, out, indent=""):
    doc = inspect.getdoc(obj)
    if not doc:
        return
    out.write(f"{indent}{name}{_signature(obj)}\n")
    for line in doc.splitlines():
        out.write(f"{indent}    {line}\n" if line else "\n")
    out.write("\n")


def build():
    """The corpus as one str; about 0.9 MB of text."""
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn when imported or inspected
        for modname in CORPUS_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue  # a trimmed Python may lack a module; the rest still makes a corpus
            out.write(f"Help on module {modname}:\n\n")
            doc = inspect.getdoc(mod)
            if doc:
                out.write(doc + "\n\n")
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj):
                    _document(f"class {name}", obj, out)
                    for mname, meth in sorted(vars(obj).items()):
                        if not mname.startswith("_") and callable(meth):
                            _document(mname, meth, out, indent="    ")
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    _document(name, obj, out)
    return out.getvalue()


if __name__ == "__main__":
    sys.stdout.buffer.write(build().encode("utf-8"))
