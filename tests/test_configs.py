from pathlib import Path

import pytest

import forge
from forge.train import TrainConfig

CONFIGS = sorted((Path(forge.__file__).parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_what_it_is_for(path):
    config = TrainConfig.build(path)
    assert config.base_model and path.stem.endswith(f"_{config.method}")  # <model>_<size>_<method>.yaml
    assert path.read_text(encoding="utf-8").startswith("# ")
    assert "Run:" in path.read_text(encoding="utf-8")
