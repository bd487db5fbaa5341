"""Callback settings declared once: a dataclass whose fields, each with a docstring under it, are the arguments.

Every lit_accel callback validates its arguments in a ``<Name>Settings`` dataclass. The callback keeps an explicit
typed ``__init__`` (what LightningCLI/jsonargparse, ``mypy`` and editors read) whose parameters are exactly the
fields, with the same defaults and annotations (``tests/test_settings.py`` checks it), and builds the settings from
its arguments with :func:`settings_from`. The argument documentation lives only under the fields:
:func:`takes_settings` writes it into the callback's ``Args:`` section at import, so ``help()``, the API docs and
``lit-accel fit --trainer.callbacks.help <Callback>`` show it.

Example:
    >>> from lit_accel.dropbp import DropBP, DropBPSettings
    >>> DropBP.settings_class is DropBPSettings
    True
    >>> print(next(line.strip() for line in DropBP.__doc__.splitlines() if line.strip().startswith("seed:")))
    seed: Seed of the mask generator (the same on every rank) and of the measurement passes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["field_docs", "settings_from", "takes_settings"]

T = TypeVar("T")
C = TypeVar("C", bound=type)

_ARGS_LINE = re.compile(r"^(?P<indent>[ \t]*)Args: see :class:`~?[\w.]*?(?P<name>\w+)`\.?[ \t]*$", re.MULTILINE)


def field_docs(settings_class: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name, read from its source (empty where the source
    cannot be read, e.g. in a build without ``.py`` files).

    Example:
        >>> from lit_accel.dropbp import DropBPSettings
        >>> field_docs(DropBPSettings)["seed"].split(" (")[0]
        'Seed of the mask generator'
    """
    try:
        source = textwrap.dedent(inspect.getsource(settings_class))
    except (OSError, TypeError):
        return {}
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, after in zip(node.body, node.body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(after.value.value)
    return docs


def takes_settings(settings_class: type) -> Callable[[C], C]:
    """Class decorator: records ``settings_class`` on the callback (``settings_class`` attribute) and replaces the
    line ``Args: see :class:`<settings_class>`.`` of its docstring by an ``Args:`` section made of the fields'
    docstrings.

    Raises:
        ValueError: At import, when the docstring has no such line (the decorator would document nothing).
    """

    def decorate(cls: C) -> C:
        cls.settings_class = settings_class  # type: ignore[attr-defined]
        doc = cls.__doc__
        if doc is None:  # python -OO strips docstrings
            return cls
        match = _ARGS_LINE.search(doc)
        if match is None or match["name"] != settings_class.__name__:
            raise ValueError(
                f"{cls.__name__}'s docstring needs the line 'Args: see :class:`{settings_class.__name__}`.' for "
                "takes_settings to fill in"
            )
        indent = match["indent"]
        docs = field_docs(settings_class)
        lines = [f"{indent}Args:"]
        for field in dataclasses.fields(settings_class):
            text = docs.get(field.name) or f"See :class:`{settings_class.__name__}`."
            first, *rest = text.splitlines()
            lines.append(f"{indent}    {field.name}: {first}")
            lines.extend(f"{indent}        {line}" if line else "" for line in rest)
        cls.__doc__ = doc[: match.start()] + "\n".join(lines) + doc[match.end() :]
        return cls

    return decorate


def settings_from(settings_class: type[T], arguments: Mapping[str, Any]) -> T:
    """Builds ``settings_class`` from a callback's ``__init__`` arguments: pass ``locals()`` before any other local
    is assigned (``self`` and ``__class__`` are not fields and are left out).

    Raises:
        KeyError: A field with no argument of that name (the signature and the dataclass disagree).

    Example:
        >>> from lit_accel.kernels.callback import FusedKernelsSettings
        >>> arguments = dict(self=None, rms_norm=True, swiglu=False, rope=True, linear_cross_entropy=True, strict=False)
        >>> settings_from(FusedKernelsSettings, arguments).swiglu
        False
    """
    fields = dataclasses.fields(settings_class)  # type: ignore[arg-type]
    return settings_class(**{f.name: arguments[f.name] for f in fields})
