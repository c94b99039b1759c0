import json
from pathlib import Path

import forge

ROOT = Path(__file__).resolve().parent.parent


def test_server_manifest_matches_the_package_and_the_registry_schema():
    manifest = json.loads((ROOT / "server_manifest.json").read_text(encoding="utf-8"))
    # required by server.schema.json (2025-12-11): name, description, version
    for key in ("name", "description", "version"):
        assert manifest.get(key), key
    assert manifest["$schema"].endswith("/2025-12-11/server.schema.json")
    assert "/" in manifest["name"] and len(manifest["description"]) <= 100
    assert manifest["version"] == forge.__version__
    package = manifest["packages"][0]
    assert package["registryType"] == "pypi" and package["transport"] == {"type": "stdio"}
    assert package["version"] == forge.__version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'name = "{package["identifier"]}"' in pyproject and f'version = "{forge.__version__}"' in pyproject
    env = {v["name"]: v for v in package["environmentVariables"]}
    assert set(env) == {"FORGE_HOME", "FORGE_ALLOWED_ROOTS", "HF_TOKEN"}
    assert env["HF_TOKEN"]["isSecret"] is True and env["FORGE_HOME"]["isSecret"] is False
