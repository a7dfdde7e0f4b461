from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from pipeline.core.config import JobConfig, load_config
from pipeline.core.errors import ConfigError
from tests.helpers import REPO, write_config


def test_shipped_configs_load() -> None:
    demo = load_config(REPO / "configs/demo.yaml")
    assert demo.model.preset == "tiny"
    assert demo.resources.gpus_per_actor == 0
    lightning = load_config(REPO / "configs/lightning-4step.yaml")
    assert lightning.model.preset == "lightning-4step"
    assert lightning.generation.steps == 4
    assert lightning.generation.guidance_scale == 0.0
    assert lightning.resources.gpus_per_actor == 1


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", manifest="m.parquet", output="out", generation={"batchsize": 8})
    with pytest.raises(ConfigError, match=r"generation\.batchsize: unknown key"):
        load_config(path)


def test_missing_required_and_bad_values_are_named(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", output="out", generation={"batch_size": 0})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "manifest: required but missing" in message
    assert "generation.batch_size" in message


def test_cli_overrides_are_typed_and_win(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", manifest="m.parquet", output="out")
    config = load_config(
        path,
        output="s3://b/o",
        overrides=[
            "generation.batch_size=8",
            "generation.guidance_scale=1.5",
            "model.path=null",
            "write.layout=webdataset",
        ],
    )
    assert config.output == "s3://b/o"
    assert config.generation.batch_size == 8
    assert config.generation.guidance_scale == 1.5
    assert config.model.path is None
    assert config.write.layout == "webdataset"


@pytest.mark.parametrize("item", ["generation.batch_size", "=3", "manifest.x=1"])
def test_malformed_overrides(tmp_path: Path, item: str) -> None:
    path = write_config(tmp_path / "c.yaml", manifest="m.parquet", output="out")
    with pytest.raises(ConfigError):
        load_config(path, overrides=[item])


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("manifest: !!python/object/apply:os.system ['echo pwned']\noutput: out\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_secrets_are_masked_in_dumps(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml", manifest="m.parquet", output="out", storage={"key": "AKIASECRET", "secret": "shh-123"}
    )
    config = load_config(path)
    dumped = str(config.model_dump(mode="json")) + repr(config)
    assert "AKIASECRET" not in dumped and "shh-123" not in dumped
    assert config.storage.secret is not None and config.storage.secret.get_secret_value() == "shh-123"


def test_every_config_field_has_a_description() -> None:
    """The descriptions are the configuration reference (docs/configuration.md is generated from
    them; tests/docs/test_config_reference.py checks that page): none may be missing."""

    def undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                found.append(f"{prefix}{name}")
            kind = field.annotation
            item = get_args(kind)[0] if get_origin(kind) is list else kind
            if isinstance(item, type) and issubclass(item, BaseModel):
                found += undescribed(item, f"{prefix}{name}{'[]' if item is not kind else ''}.")
        return found

    missing = undescribed(JobConfig)
    assert not missing, f"config fields without a description (pipeline/core/config.py): {missing}"


def test_a_misspelt_key_gets_a_suggestion_and_a_flag_is_named(tmp_path: Path) -> None:
    """A close valid key is suggested; a value given with --set (or --manifest/--output) is
    reported as that flag's, not as the file's."""
    path = write_config(tmp_path / "c.yaml", manifest="m.parquet", output="out", generation={"batchsize": 8})
    with pytest.raises(ConfigError, match=r"generation\.batchsize: unknown key \(did you mean `batch_size`\?"):
        load_config(path)
    clean = write_config(tmp_path / "ok.yaml", manifest="m.parquet", output="out")
    with pytest.raises(ConfigError) as bad_value:
        load_config(clean, overrides=["generation.batch_size=abc"])
    assert "generation.batch_size (from --set generation.batch_size=...): Input should be a valid integer" in str(
        bad_value.value
    )
    with pytest.raises(ConfigError, match=r"genration \(from --set genration.steps=...\): unknown key \(did you mean"):
        load_config(clean, overrides=["genration.steps=4"])
    with pytest.raises(ConfigError, match=r"unknown key \(check the spelling"):
        load_config(clean, overrides=["zzzz=1"])
