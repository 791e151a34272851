"""The CI jobs of docs/review.md are valid for their CI systems (checked against the schemas
check-jsonschema vendors; they are not run here), and the example spec loads."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from ruamel.yaml import YAML

from propscope.review import load_spec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "review.md"
SCHEMAS = {"# .github/workflows/": "github-workflows.json", "# .gitlab-ci.yml": "gitlab-ci.json"}


def load_yaml(text: str) -> dict:
    # YAML 1.2, as the CI systems read it: `on:` is a key, not the boolean true.
    return YAML(typ="safe", pure=True).load(text)


@cache
def schema(name: str) -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / name).read_text())


def ci_jobs() -> list[tuple[str, str]]:
    """(schema file, YAML text) of every YAML block in the doc that starts with a CI file name."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [
        (name, block)
        for block in blocks
        for prefix, name in SCHEMAS.items()
        if block.startswith(prefix)
    ]


def test_the_doc_has_a_github_and_a_gitlab_job():
    assert sorted(name for name, _ in ci_jobs()) == ["github-workflows.json", "gitlab-ci.json"]


@pytest.mark.parametrize(("schema_name", "text"), ci_jobs())
def test_each_ci_job_is_valid_for_its_ci_system(schema_name, text):
    document = load_yaml(text)
    validator = jsonschema.Draft7Validator(schema(schema_name))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors
    assert "propscope review" in text and "junit.xml" in text


def test_a_broken_job_is_caught_by_the_schema():
    name, text = next(job for job in ci_jobs() if job[0] == "github-workflows.json")
    document = load_yaml(text)
    document["jobs"]["propscope-review"]["runs-on"] = 42
    del document["jobs"]["propscope-review"]["steps"]
    assert list(jsonschema.Draft7Validator(schema(name)).iter_errors(document))


def test_the_example_spec_loads_with_its_images():
    spec, images = load_spec(ROOT / "examples" / "review" / "hue-shortcut.yaml")
    assert len(images) == 24 and all(image.label in (0, 1) for image in images)
    assert spec.baseline is not None and spec.rules
