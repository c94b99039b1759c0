"""The MCP registry entry installs and starts as written, and validates against the registry's schema.

tests/fixtures/server.schema.2025-12-11.json is the registry's server.json schema (MIT, from
github.com/modelcontextprotocol/registry), as published at the URL its "$id" names; kept here so the
check needs no network."""

import json
import tomllib
from pathlib import Path

import jsonschema

import forge

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "fixtures" / "server.schema.2025-12-11.json"


def manifest() -> dict:
    return json.loads((ROOT / "server_manifest.json").read_text(encoding="utf-8"))


def test_the_manifest_validates_against_the_registry_schema_it_names():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    entry = manifest()
    assert entry["$schema"] == schema["$id"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(entry), key=str)
    assert errors == [], [e.message for e in errors]
    broken = {**entry, "packages": [{**entry["packages"][0], "version": "latest"}]}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))  # the check can fail


def test_the_registry_entry_names_a_command_the_package_installs():
    entry, project = manifest(), tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    package = entry["packages"][0]
    assert package["registryType"] == "pypi" and package["runtimeHint"] == "uvx"
    assert package["identifier"] == project["name"] and package["version"] == project["version"] == forge.__version__
    # `uvx <identifier>` runs the console script named like the package: it must start the MCP server
    assert project["scripts"][package["identifier"]] == project["scripts"]["forge-mcp"]
    assert entry["version"] == forge.__version__ and len(entry["description"]) <= 100
    env = {v["name"]: v for v in package["environmentVariables"]}
    assert set(env) == {"FORGE_HOME", "FORGE_ALLOWED_ROOTS", "HF_TOKEN"} and env["HF_TOKEN"]["isSecret"] is True


def test_the_readme_carries_the_mcp_name_the_registry_checks_for():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"mcp-name: {manifest()['name']}" in readme
