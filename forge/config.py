"""Config plumbing shared by every stage: unknown keys are errors, YAML < CLI overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from forge.errors import Codes, ForgeError

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage config. Unknown keys are rejected, never silently dropped."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def build(cls: type[C], yaml_path: Path | str | None = None, **overrides: Any) -> C:
        """Defaults < YAML file < explicit overrides (``None`` overrides are ignored)."""
        data: dict[str, Any] = {}
        source = "arguments"
        if yaml_path is not None:
            yaml_path = Path(yaml_path)
            source = str(yaml_path)
            if not yaml_path.is_file():
                raise ForgeError(Codes.CONFIG_INVALID, f"config file {yaml_path} does not exist",
                                 "pass the path of a YAML file, e.g. one from forge/configs/")
            try:
                loaded = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise ForgeError(Codes.CONFIG_INVALID, f"{yaml_path}: not valid YAML: {exc}",
                                 "fix the YAML syntax") from exc
            if not isinstance(loaded, dict):
                raise ForgeError(Codes.CONFIG_INVALID, f"{yaml_path}: expected a mapping of fields",
                                 "write the config as `field: value` lines")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = [_describe(err) for err in exc.errors()]
            raise ForgeError(
                Codes.CONFIG_INVALID,
                f"{source}: {len(problems)} invalid field(s): " + "; ".join(problems),
                f"see the documented fields of {cls.__name__} (forge <stage> --help)",
                details=problems,
            ) from None


    @classmethod
    def overrides_model(cls, name: str, fields: tuple[str, ...], doc: str | None) -> type[BaseModel]:
        """A model of some of this config's fields, each optional (unset = the config's default), with
        the same names, descriptions and bounds: for tools that let a caller override a few of them."""
        definitions = {}
        for field in fields:
            info = copy.copy(cls.model_fields[field])
            info.default, info.default_factory = None, None
            definitions[field] = (info.annotation | None, info)
        return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **definitions)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ())) or "(config)"
    if err.get("type") == "extra_forbidden":
        return f"'{where}' is not a known field"
    return f"'{where}': {err.get('msg')} (got {err.get('input')!r})"
