"""Experiment configs: every config file and variant loads, ``--set`` overrides, JSON round trip."""

import pathlib

import pytest

from jaxformer.training.experiment import (
    ExperimentConfig,
    from_dict,
    keys,
    load_config,
    load_json,
    override,
    save_json,
    to_dict,
)

from helpers import EXPERIMENTS, as_a_user

CONFIGS = sorted((EXPERIMENTS / "configs").glob("*.py"))
VARIANTS = {"num2words": ("default", "demo", "smoke")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_and_variant_loads(path):
    for variant in VARIANTS.get(path.stem, ("default", "cpu", "smoke")):
        config = load_config(path, variant)
        assert isinstance(config, ExperimentConfig)
        assert from_dict(to_dict(config)) == config
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        load_config(path, "nope")


def test_overrides_parse_by_field_type():
    config = override(
        ExperimentConfig(),
        [
            "run.train_steps=7",
            "optim.clip_norm=1",  # an int for a float | None field becomes a float
            "run.max_minutes=None",
            "data.language=de",  # a bare word for a string field
            "data.text_file=4",  # digits for a string field stay a string
            "model.pre_norm=False",
        ],
    )
    assert config.run.train_steps == 7
    assert config.optim.clip_norm == 1.0 and isinstance(config.optim.clip_norm, float)
    assert config.run.max_minutes is None
    assert config.data.language == "de" and config.data.text_file == "4"
    assert config.model.pre_norm is False


@pytest.mark.parametrize(
    "assignment, message",
    [
        (
            "run.steps=3",
            r"unknown config key 'run.steps' \(did you mean 'run.train_steps'\?\); known keys: "
            r"task, data.corpus",
        ),
        ("run.train_steps", r"expects key=value"),
        ("run.train_steps=1.5", r"run.train_steps=1.5: expected int"),
        ("run.train_steps=0", r"run.train_steps must be >= 1"),
        ("model.pre_norm=1", r"expected bool"),
        ("model.num_heads=5", r"num_heads \(5\) must divide d_model"),
        ("data.tokenizer=bpe", r"tokenizer must be one of \('char', 'byte', 'sentencepiece'\)"),
        ("optim.label_smoothing=1.0", r"label_smoothing must be in \[0, 1\)"),
        ("task=lm", r"task 'lm' cannot train on data.corpus='numbers'"),
        ("run.mesh_data=0", r"run.mesh_data=0: run.mesh_data must be >= 1 or -1 \(all devices\)"),
        ("run.mesh_model=0", r"run.mesh_model=0: run.mesh_model must be >= 1, got 0"),
        ("run.mesh_model=2.0", r"run.mesh_model=2.0: expected int"),
        ("run.mesh_data=3", r"run.batch_size \(64\) must be a multiple of run.mesh_data \(3\)"),
    ],
)
def test_bad_overrides_name_the_key(assignment, message):
    with pytest.raises(ValueError, match=message), as_a_user():
        override(ExperimentConfig(), [assignment])


def test_every_key_is_settable_to_its_own_value():
    config = load_config(EXPERIMENTS / "configs" / "num2words.py", "demo")
    flat = {}
    for section, values in to_dict(config).items():
        if isinstance(values, dict):
            flat |= {f"{section}.{k}": v for k, v in values.items()}
        else:
            flat[section] = values
    assert sorted(flat) == sorted(keys(config))
    assignments = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in flat.items()]
    assert override(config, assignments) == config


def test_the_mesh_is_a_run_setting_and_old_configs_default_to_one_device():
    config = override(ExperimentConfig(), ["run.mesh_data=-1", "run.mesh_model=2"])
    assert (config.run.mesh_data, config.run.mesh_model) == (-1, 2)
    assert (ExperimentConfig().run.mesh_data, ExperimentConfig().run.mesh_model) == (1, 1)
    # A config.json written before the mesh keys existed (an old workdir) still loads.
    data = to_dict(config)
    del data["run"]["mesh_data"], data["run"]["mesh_model"]
    assert from_dict(data) == ExperimentConfig()


def test_json_round_trip_and_unknown_keys(tmp_path):
    config = override(ExperimentConfig(), ["model.d_model=64", "run.batch_size=3"])
    save_json(config, tmp_path / "config.json")
    assert load_json(tmp_path / "config.json") == config
    data = to_dict(config)
    data["model"]["colour"] = "blue"
    with pytest.raises(ValueError, match=r"section 'model' has unknown keys \['colour'\]"):
        from_dict(data)
    with pytest.raises(FileNotFoundError, match="is this a jaxformer workdir"):
        load_json(tmp_path / "missing.json")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "missing.py")
    empty = pathlib.Path(tmp_path / "empty.py")
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(empty)
