"""docs/operations.md is the configuration reference: it must list every setting."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from propscope_server.config import Settings

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def environment_variables(model: type[BaseModel], prefix: str) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += environment_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            names.append(field.validation_alias or f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_documented():
    text = OPERATIONS.read_text()
    variables = environment_variables(Settings, "PROPSCOPE_")
    assert "PROPSCOPE_LIMITS__MAX_EDITS" in variables and "REDIS_URL" in variables
    missing = [
        v
        for v in variables
        if f"`{v}`" not in text and f"`{v.removeprefix('PROPSCOPE_LIMITS__')}`" not in text
    ]
    assert not missing, f"settings missing from docs/operations.md: {missing}"
