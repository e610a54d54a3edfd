"""hetrefine.config: the schema, defaults, and the errors a user sees for a bad config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hetrefine import config as hc
from hetrefine.errors import InputError
from hetrefine.plan import n_shards

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def shipped() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def walk(schema: dict, prefix: str = ""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{prefix}{key}", sub
        yield from walk(sub, f"{prefix}{key}.")


def test_schema_documents_every_key():
    schema = hc.load_schema(SCHEMA)
    keys = list(walk(schema))
    assert len(keys) > 30
    for key, sub in keys:
        assert sub.get("description", "").strip(), f"{key} has no description"
        assert "default" in sub, f"{key} has no default"
        types = [sub["type"]] if isinstance(sub["type"], str) else sub["type"]
        if {"integer", "number"} & set(types):
            bounds = {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}
            assert bounds & set(sub), f"{key} is numeric but has no bounds"


def test_config_yaml_is_exactly_the_defaults():
    """config.yaml lists every key, with the schema's default: the two never drift apart."""
    assert shipped() == hc.defaults(SCHEMA)
    assert hc.load_config(ROOT / "config.yaml", schema_path=SCHEMA) == hc.defaults(SCHEMA)


def test_empty_config_is_filled_with_defaults():
    filled = hc.validate_config({"iterations": 3, "mask": {"enabled": False}}, schema_path=SCHEMA)
    assert filled["iterations"] == 3
    assert filled["mask"] == {
        "enabled": False, "inner_diameter_A": None, "outer_diameter_A": None,
        "file": None, "apply_to": "both", "soft_edge_A": 8, "solvent": True,
        "solvent_threshold": 0.1, "solvent_extend_A": 4,
    }  # fmt: skip
    assert filled["demo"]["n_particles"] == 1000
    assert set(filled) == set(hc.defaults(SCHEMA))


def check_error(overrides: dict, *fragments: str, key: str | None = None) -> InputError:
    config = {**shipped(), **overrides}
    with pytest.raises(InputError) as info:
        hc.validate_config(config, schema_path=SCHEMA, source="my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml"), message
    for fragment in fragments:
        assert fragment in message, message
    if key is not None:
        assert info.value.where == f"key '{key}'"
    return info.value


def test_unknown_key_names_it_and_suggests():
    check_error(
        {"iteration": 3}, "unknown key 'iteration'", "did you mean 'iterations'", key="iteration"
    )


def test_unknown_nested_key():
    check_error(
        {"mask": {"enable": True}}, "unknown key 'mask.enable'", "mask.enabled", key="mask.enable"
    )


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"iterations": "many"}, "iterations", "'many' is not of type 'integer'"),
        ({"iterations": 0}, "iterations", "less than the minimum"),
        ({"class_similarity": 1.5}, "class_similarity", "greater than the maximum"),
        ({"classification": "fuzzy"}, "classification", "'fuzzy' is not one of"),
        ({"symmetry": "X3"}, "symmetry", "does not match"),
        ({"device": "tpu"}, "device", "is not one of"),
        ({"mask": {"enabled": "sometimes"}}, "mask.enabled", "is not of type 'boolean'"),
        ({"demo": {"box": 33}}, "demo.box", "not a multiple of 2"),
        ({"initial_models": "a.mrc"}, "initial_models", "is not of type 'array'"),
    ],
)
def test_wrong_type_or_bound(overrides, key, fragment):
    err = check_error(overrides, fragment, key=key)
    assert "Expected:" in str(err)


def test_outer_mask_under_inner():
    check_error(
        {"mask": {"inner_diameter_A": 150, "outer_diameter_A": 120}},
        "outer diameter (120 A)",
        "inner diameter",
        key="mask.outer_diameter_A",
    )
    # the inner diameter defaults to the particle diameter
    check_error(
        {"particle_diameter_A": 150, "mask": {"outer_diameter_A": 120}},
        "particle_diameter_A = 150",
        key="mask.outer_diameter_A",
    )
    ok = hc.validate_config(
        {"mask": {"inner_diameter_A": 150, "outer_diameter_A": 150}}, schema_path=SCHEMA
    )
    assert ok["mask"]["outer_diameter_A"] == 150


def test_one_initial_model():
    check_error({"initial_models": ["a.mrc"]}, "at least 2 initial models", key="initial_models")


def test_odd_refine_box():
    check_error({"refine_box": 63}, "refine_box must be even", "62 or 64", key="refine_box")


def test_demo_models_must_be_written_by_the_demo():
    three = [f"results/demo_data/initial_model_{k:02d}.mrc" for k in (1, 2, 3)]
    check_error({"initial_models": three}, "not written by the demo", key="initial_models")
    ok = hc.validate_config({"initial_models": three, "demo": {"decoy": True}}, schema_path=SCHEMA)
    assert hc.demo_initial_models(ok["demo"]) == three


def test_command_line_strings_are_read_as_yaml():
    """Snakemake's --config gives nested values as strings; they are read where a number is due."""
    filled = hc.validate_config(
        {"refine_box": "null", "demo": {"n_particles": "200", "snr": "0.5", "decoy": "true"}},
        schema_path=SCHEMA,
    )
    assert filled["refine_box"] is None
    assert filled["demo"]["n_particles"] == 200
    assert filled["demo"]["snr"] == 0.5
    assert filled["demo"]["decoy"] is True
    assert hc.validate_config({"iterations": 4.0}, schema_path=SCHEMA)["iterations"] == 4
    assert hc.validate_config({"run": "123"}, schema_path=SCHEMA)["run"] == "123"


def test_load_config_merges_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 3\ndemo:\n  box: 32\n")
    config = hc.load_config(path, overrides={"demo": {"n_particles": 50}}, schema_path=SCHEMA)
    assert config["iterations"] == 3
    assert config["demo"]["box"] == 32 and config["demo"]["n_particles"] == 50
    assert config["demo"]["snr"] == 0.1
    with pytest.raises(InputError, match="does not exist"):
        hc.load_config(tmp_path / "nope.yaml", schema_path=SCHEMA)
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        hc.load_config(tmp_path / "bad.yaml", schema_path=SCHEMA)


def test_dataset_size_demo_and_refine_box_bound():
    config = hc.validate_config({"demo": {"n_particles": 321, "box": 40}}, schema_path=SCHEMA)
    assert hc.dataset_size(config) == (321, 40)
    config = hc.validate_config({"demo": {"box": 40}, "refine_box": 48}, schema_path=SCHEMA)
    with pytest.raises(
        InputError, match=r"refine_box = 48 px is larger than the particle box \(40 px\)"
    ):
        hc.dataset_size(config)


STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
1 opticsGroup1 1.5 {box} 2

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
{rows}
"""


def test_dataset_size_reads_a_star_file(tmp_path):
    rows = "\n".join(f"{i:06d}@stack.mrcs 1" for i in range(1, 8))
    (tmp_path / "p.star").write_text(STAR.format(box=64, rows=rows))
    config = hc.validate_config({"particles": "p.star", "refine_box": 48}, schema_path=SCHEMA)
    assert hc.dataset_size(config, workdir=tmp_path) == (7, 64)
    config["refine_box"] = 96
    with pytest.raises(InputError, match="larger than the particle box"):
        hc.dataset_size(config, workdir=tmp_path)
    config["particles"] = "missing.star"
    with pytest.raises(InputError, match="does not exist"):
        hc.dataset_size(config, workdir=tmp_path)


@pytest.mark.parametrize(
    ("n", "size", "shards"), [(1000, 500, 2), (1001, 500, 3), (10, 500, 1), (1, 1, 1)]
)
def test_n_shards(n, size, shards):
    assert n_shards(n, size) == shards


def test_missing_initial_model_is_named(tmp_path):
    (tmp_path / "a.mrc").write_bytes(b"")
    config = hc.validate_config({"initial_models": ["a.mrc", "b.mrc"]}, schema_path=SCHEMA)
    with pytest.raises(
        InputError, match=r"b.mrc \(key 'initial_models', entry 2\): initial model does not exist"
    ):
        hc.check_input_files(config, workdir=tmp_path)
    (tmp_path / "b.mrc").write_bytes(b"")
    hc.check_input_files(config, workdir=tmp_path)
    # the demo's models are made by the workflow
    hc.check_input_files(hc.defaults(SCHEMA), workdir=tmp_path)
