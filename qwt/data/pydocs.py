"""English text that Python ships: the documentation strings of the standard library, gathered
deterministically (source files parsed with ``ast``, nothing imported), for the embedded language
model (tokenizer, training, held-out perplexity, a multiple-choice task).

Documents are the docstrings of modules, classes and functions of every ``.py`` file under the
standard library folder (sorted paths; tests, idlelib, site-packages, lib2to3 and turtledemo
excluded), cleaned with ``inspect.cleandoc``; docstrings shorter than ``min_chars`` are dropped.
Split: by file, a stable hash of the relative path puts ~``valid_fraction`` of the files into the
held-out split (documents of one module never straddle the splits).

The text depends on the Python version; its sha256 is recorded with the trained weights and
checked by the task (a different Python gives a different held-out set; the run says so).
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import os
import sysconfig
from functools import lru_cache

EXCLUDE_DIRS = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__",
                "ensurepip", "pydoc_data", "tkinter")


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDE_DIRS and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(".py"):
                p = os.path.join(d, f)
                out.append((os.path.relpath(p, root).replace(os.sep, "/"), p))
    return sorted(out)


def docstrings(path: str, min_chars: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=False)
            if d:
                d = inspect.cleandoc(d).strip()
                if len(d) >= min_chars and d.isascii():
                    out.append(d)
    return out


def _held_out(rel: str, valid_fraction: float) -> bool:
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < valid_fraction


@lru_cache(maxsize=4)
def corpus(valid_fraction: float = 0.1, min_chars: int = 40) -> dict:
    """{"train": [doc, ...], "valid": [doc, ...], "sha256": digest of both, "python": version}."""
    import platform

    train, valid = [], []
    for rel, p in stdlib_files():
        (valid if _held_out(rel, valid_fraction) else train).extend(docstrings(p, min_chars))
    h = hashlib.sha256()
    for part in (train, valid):
        for d in part:
            h.update(d.encode())
            h.update(b"\0")
        h.update(b"\1")
    return {"train": train, "valid": valid, "sha256": h.hexdigest(), "python": platform.python_version()}


def join(docs: list[str]) -> str:
    """Documents as one text stream (as WikiText-2's test split is joined)."""
    return "\n\n".join(docs)
