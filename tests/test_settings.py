"""Each callback argument is declared once: the settings dataclass, a docstring under every field.

The callbacks keep an explicit typed ``__init__`` for LightningCLI, mypy and editors; these tests hold it to the
dataclass (names, order, defaults, annotations), and hold the shipped YAML to it: a key that is not a field fails,
a fragment in ``callbacks/`` lists every field of its callback with a comment on each (it is the menu of knobs),
and the complete runs in ``configs/``, ``recipes/`` and the benchmark overlays set only fields (they list the
knobs their run changes, each with a comment, which tests/test_configs.py checks for every key).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

import lit_accel.callbacks
from lit_accel.settings import field_docs, settings_from, takes_settings

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS: dict[str, type[L.Callback]] = {
    name: getattr(lit_accel.callbacks, name) for name in lit_accel.callbacks.__all__
}
FRAGMENTS = sorted((ROOT / "callbacks").glob("*.yaml"))
RUNS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yaml"))
RUNS += sorted((ROOT / "benchmarks").glob("*.yaml"))


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    if cls.__init__ is object.__init__:  # type: ignore[misc]
        return []
    return list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]


def _settings_class(cls: type) -> type | None:
    return getattr(cls, "settings_class", None)


WITH_SETTINGS = {name: cls for name, cls in CALLBACKS.items() if _settings_class(cls) is not None}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_a_callback_with_arguments_declares_them_in_a_settings_dataclass(name: str) -> None:
    cls = CALLBACKS[name]
    if not _init_parameters(cls):
        return  # takes no settings (DynamicBatchLoading reads its schedule from the data module)
    settings = _settings_class(cls)
    assert settings is not None, f"{name} takes arguments but has no @takes_settings(<{name}Settings>)"
    assert dataclasses.is_dataclass(settings), f"{name}.settings_class is not a dataclass"


@pytest.mark.parametrize("name", sorted(WITH_SETTINGS))
def test_init_parameters_are_the_settings_fields(name: str) -> None:
    cls = WITH_SETTINGS[name]
    settings = _settings_class(cls)
    assert settings is not None
    fields = dataclasses.fields(settings)
    params = _init_parameters(cls)
    assert [p.name for p in params] == [f.name for f in fields], f"{name}.__init__ and {settings.__name__} differ"
    init_types = typing.get_type_hints(cls.__init__)
    field_types = typing.get_type_hints(settings)
    for param, field in zip(params, fields):
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{name}({param.name}): a plain argument"
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert param.default == default, (
            f"{name}({param.name}={param.default!r}) but the field's default is {default!r}"
        )
        assert init_types[param.name] == field_types[field.name], (
            f"{name}({param.name}: {init_types[param.name]}) but {settings.__name__}.{field.name}: "
            f"{field_types[field.name]}"
        )


@pytest.mark.parametrize("name", sorted(WITH_SETTINGS))
def test_every_field_has_a_docstring_and_the_callback_shows_them(name: str) -> None:
    cls = WITH_SETTINGS[name]
    settings = _settings_class(cls)
    assert settings is not None
    docs = field_docs(settings)
    doc = cls.__doc__ or ""
    for field in dataclasses.fields(settings):
        assert docs.get(field.name, "").strip(), f"{settings.__name__}.{field.name} has no docstring under it"
        first_line = docs[field.name].splitlines()[0]
        assert f"{field.name}: {first_line}" in doc, f"{name}'s Args section lacks {field.name}"


def _callback_entries(node: Any) -> Iterator[tuple[type, dict[str, Any]]]:
    """(class, init_args) of every lit_accel callback given by class_path anywhere in a YAML document."""
    if isinstance(node, dict):
        path = node.get("class_path")
        if isinstance(path, str) and path.startswith("lit_accel."):
            module, _, attr = path.rpartition(".")
            cls = getattr(importlib.import_module(module), attr)
            if isinstance(cls, type) and issubclass(cls, L.Callback):
                yield cls, dict(node.get("init_args") or {})
        for value in node.values():
            yield from _callback_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _callback_entries(value)


def _field_names(cls: type) -> list[str]:
    settings = _settings_class(cls)
    return [f.name for f in dataclasses.fields(settings)] if settings is not None else []


@pytest.mark.parametrize("path", FRAGMENTS + RUNS, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_keys_are_fields(path: Path) -> None:
    for cls, init_args in _callback_entries(yaml.safe_load(path.read_text())):
        unknown = sorted(set(init_args) - set(_field_names(cls)))
        assert not unknown, f"{path.name}: {cls.__name__} has no argument {unknown} (fields: {_field_names(cls)})"


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_fragments_list_every_field_with_a_comment(path: Path) -> None:
    text = path.read_text()
    entries = list(_callback_entries(yaml.safe_load(text)))
    assert entries, f"{path.name} adds no lit_accel callback"
    for cls, init_args in entries:
        missing = [name for name in _field_names(cls) if name not in init_args]
        assert not missing, f"{path.name}: {cls.__name__}'s fragment omits {missing}"
        for key in init_args:
            assert re.search(rf"^\s+{key}:[^\n#]*#\s*\S", text, re.MULTILINE), f"{path.name}: {key} has no comment"


# ------------------------------------------------------------------------------------------- the mechanism itself


@dataclasses.dataclass
class _DemoSettings:
    times: int = 1
    """How often to say it."""
    loud: bool = False
    """Shout it
    (on two lines)."""


def test_takes_settings_writes_the_args_section_and_settings_from_takes_the_arguments() -> None:
    @takes_settings(_DemoSettings)
    class Demo:
        """Says things.

        Args: see :class:`_DemoSettings`.

        Example:
            >>> Demo()
        """

        def __init__(self, times: int = 1, loud: bool = False) -> None:
            self.settings = settings_from(_DemoSettings, locals())

    assert Demo(times=3).settings == _DemoSettings(times=3)
    assert Demo.settings_class is _DemoSettings  # type: ignore[attr-defined]
    doc = Demo.__doc__ or ""
    assert "        Args:\n            times: How often to say it.\n            loud: Shout it\n" in doc
    assert "                (on two lines).\n\n        Example:" in doc

    with pytest.raises(ValueError, match="needs the line 'Args: see :class:`_DemoSettings`.'"):

        @takes_settings(_DemoSettings)
        class Undocumented:
            """No Args line."""

    with pytest.raises(KeyError, match="loud"):
        settings_from(_DemoSettings, {"self": None, "times": 2})


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_lightning_hooks_are_marked_override(name: str) -> None:
    """A misspelt hook would never be called; ``@override`` lets type checkers catch it."""
    cls = CALLBACKS[name]
    for attr, value in vars(cls).items():
        if attr in vars(L.Callback) and callable(value) and not attr.startswith("__"):
            assert getattr(value, "__override__", False), f"{name}.{attr} implements a Lightning hook without @override"


METHOD_CARDS = {
    "DropBP": "dropbp.md",
    "SemiStructuredSparsity": "sparsity24.md",
    "StructuredPruning": "pruning.md",
    "LoRA": "lora.md",
    "LowRankFactorization": "factorization.md",
    "FusedKernels": "kernels.md",
}


def _knob_rows(card: Path) -> dict[str, str]:
    """``name -> default`` from the first table of the card's "Knobs" section."""
    text = card.read_text()
    section = text.split("## Knobs", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


@pytest.mark.parametrize("name", sorted(METHOD_CARDS))
def test_the_method_card_lists_every_knob_with_its_default(name: str) -> None:
    settings_class = _settings_class(CALLBACKS[name])
    assert settings_class is not None
    rows = _knob_rows(ROOT / "docs" / "methods" / METHOD_CARDS[name])
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    assert set(fields) <= set(rows), f"docs/methods/{METHOD_CARDS[name]} misses knobs {sorted(set(fields) - set(rows))}"
    for field_name, f in fields.items():
        if f.default is dataclasses.MISSING:
            continue
        shown = rows[field_name]
        expected = {repr(f.default), str(f.default), f'"{f.default}"'}
        if f.default is None:
            expected.add("None")
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            try:
                if float(shown) == float(f.default):
                    continue
            except ValueError:
                pass
        assert shown in expected or shown.replace("'", '"') in expected, (
            f"docs/methods/{METHOD_CARDS[name]}: {field_name} shows default {shown!r}, the code has {f.default!r}"
        )


def test_the_readme_links_every_method_card() -> None:
    readme = (ROOT / "README.md").read_text()
    for card in METHOD_CARDS.values():
        assert f"docs/methods/{card}" in readme, f"README.md does not link docs/methods/{card}"
