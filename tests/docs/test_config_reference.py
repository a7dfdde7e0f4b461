"""The configuration reference in docs/configuration.md is generated from the config model, and
the committed page is what the generator writes today."""

from __future__ import annotations

import difflib
import importlib.util
from types import ModuleType
from typing import Literal

import pytest
from pydantic import BaseModel, Field, SecretStr

from pipeline.core.config import JobConfig
from tests.helpers import REPO

PAGE = REPO / "docs" / "configuration.md"


def _generator() -> ModuleType:
    """docs/make_config_reference.py, a script outside the package, loaded from its file."""
    spec = importlib.util.spec_from_file_location("make_config_reference", REPO / "docs" / "make_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key of the config, dotted; items of a list of models as `key[].field`."""
    found = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += _keys(kind, f"{prefix}{name}.")
            continue
        found.append(f"{prefix}{name}")
        item = getattr(kind, "__args__", (None,))[0] if getattr(kind, "__origin__", None) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            found += _keys(item, f"{prefix}{name}[].")
    return found


def test_configuration_page_is_up_to_date() -> None:
    generator = _generator()
    page = PAGE.read_text(encoding="utf-8")
    fresh = generator.replace_block(page, generator.render_reference(JobConfig))
    if fresh != page:
        diff = "".join(
            list(difflib.unified_diff(page.splitlines(True), fresh.splitlines(True), "committed", "generated"))[:40]
        )
        pytest.fail(f"docs/configuration.md is stale: run `python docs/make_config_reference.py` (make docs)\n{diff}")


def test_every_config_key_is_in_the_generated_reference() -> None:
    """The spirit of the old hand-kept README table's test: no key goes undocumented."""
    generator = _generator()
    page = PAGE.read_text(encoding="utf-8")
    block = page[page.index(generator.BEGIN) : page.index(generator.END)]
    missing = [key for key in _keys(JobConfig) if f"| `{key}` |" not in block]
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"
    assert len(_keys(JobConfig)) > 40


class _Item(BaseModel):
    path: str = Field(description="Where it is.")
    weight: float = Field(default=1.0, ge=-4.0, le=4.0, description="How much.")


class _Section(BaseModel):
    kind: Literal["a", "b"] = Field(default="a", description="`a` or <b>.")
    size: int | None = Field(default=None, ge=8, description="Pixels | rows.")
    span: int | tuple[int, int] | None = Field(default=None, description="A count or a range.")
    share: float = Field(default=1.0, gt=0.0, description="A share.")
    key: SecretStr | None = Field(default=None, description="A secret.")
    items: list[_Item] = Field(default_factory=list, description="Things.")
    on: bool = Field(default=True, description="A switch.")


class _Root(BaseModel):
    name: str = Field(description="A name.")
    section: _Section = Field(default_factory=_Section, description="A section.")


def test_types_defaults_and_cells_are_rendered_as_a_user_writes_yaml() -> None:
    block = _generator().render_reference(_Root)
    rows = {line.split(" | ")[0].strip("| `"): line for line in block.splitlines() if line.startswith("| `")}
    assert rows["name"] == "| `name` | string | required | A name. |"
    assert rows["section.kind"] == "| `section.kind` | `a`, `b` | `a` | `a` or &lt;b&gt;. |"
    assert rows["section.size"] == "| `section.size` | integer, ≥ 8 | unset | Pixels \\| rows. |"
    assert rows["section.span"] == "| `section.span` | integer or `[min, max]` | unset | A count or a range. |"
    assert rows["section.share"] == "| `section.share` | number, > 0 | `1.0` | A share. |"
    assert rows["section.key"] == "| `section.key` | string (secret) | unset | A secret. |"
    assert rows["section.items"] == "| `section.items` | list of `{path, weight}` | `[]` | Things. |"
    assert rows["section.items[].path"] == "| `section.items[].path` | string | required | Where it is. |"
    assert rows["section.items[].weight"] == "| `section.items[].weight` | number, -4 to 4 | `1.0` | How much. |"
    assert rows["section.on"] == "| `section.on` | boolean | `true` | A switch. |"
    assert "### `section`\n\nA section.\n" in block


def test_a_field_without_description_stops_the_generator() -> None:
    class Bare(BaseModel):
        documented: int = Field(default=1, description="Fine.")
        bare: int = 2

    with pytest.raises(ValueError, match="without a description: bare"):
        _generator().render_reference(Bare)
