"""The config schema: YAML + overrides in, typed values out, clear errors for bad keys."""

import pytest

from pipeline.config import ConfigError, load_config


def test_overrides_are_parsed_as_yaml_into_the_schema_types():
    c = load_config(
        None,
        [
            "train.lr=3e-4",
            "train.betas=[0.9,0.99]",
            "model.qkv_bias=true",
            "train.max_tokens=1e6",
            "tracking.wandb.tags=[a,b]",
        ],
    )
    assert c.train.lr == 3e-4 and c.train.betas == (0.9, 0.99) and c.model.qkv_bias is True
    assert c.train.max_tokens == 1_000_000 and isinstance(c.train.max_tokens, int)
    assert c.tracking.wandb.tags == ["a", "b"]


def test_no_is_a_string_not_a_yaml_1_1_boolean(tmp_path):
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  precision: no\neval:\n  prompt: yes\n")
    c = load_config(path)
    assert c.train.precision == "no" and c.eval.prompt == "yes"


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'train.lrr'.*valid keys here: micro_batch_size.*lr"):
        load_config(None, ["train.lrr=1"])


def test_wrong_type_and_choice_are_named():
    with pytest.raises(ConfigError, match="train.micro_batch_size must be int"):
        load_config(None, ["train.micro_batch_size=big"])
    with pytest.raises(
        ConfigError, match="train.precision='fp8' is not one of: auto, fp32, no, bf16, fp16"
    ):
        load_config(None, ["train.precision=fp8"])


def test_source_keys_must_belong_to_the_source_kind():
    with pytest.raises(ConfigError, match="data.source.url does not apply to kind 'files'"):
        load_config(
            None,
            ["data.source.kind=files", "data.source.paths=[a.txt]", "data.source.url=http://x"],
        )


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.emb_dim=100", "model.n_heads=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_every_config_key_documents_itself_where_it_is_declared():
    """--help prints each field's own help (core.schema.setting), so a key without one
    would be listed bare."""
    from pipeline.keys import key_reference

    bare = [doc.key for doc in key_reference() if len(doc.comment) < 10]
    assert not bare, bare


def test_a_section_names_its_keys_where_it_sits():
    """The same SourceConfig check names data.source.* alone and data.sources[i].source.*
    in a mixture; a section built directly names its usual place."""
    from pipeline.config import SourceConfig

    with pytest.raises(ConfigError, match=r"^data\.source\.max_bytes=0 is not allowed"):
        load_config(None, ["data.source.max_bytes=0"])
    mixture = (
        "data.sources=[{name: a, source: {kind: python-stdlib}}, "
        "{name: b, source: {kind: python-stdlib, max_bytes: 0}}]"
    )
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.source\.max_bytes=0 is not"):
        load_config(None, [mixture])
    with pytest.raises(ConfigError, match=r"^data\.source\.paths is empty"):
        SourceConfig(kind="files")
