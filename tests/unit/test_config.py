import pytest

from ray_ad.config import apply_overrides, from_dict, load_file, override_section, set_dotted
from ray_ad.errors import ConfigError
from ray_ad.methods import method_config


def test_overrides_parse_yaml_values_into_nested_keys():
    overrides = ["train.steps=7", "backbone.layers=[2, 3]", "t=250", "train.lr=3e-4"]
    data = apply_overrides({"train": {"lr": 0.1}}, overrides)
    config = method_config("osd_irf", data)
    assert config.train.steps == 7 and config.train.lr == 3e-4
    assert config.backbone.layers == (2, 3)
    assert config.t == 250


def test_partial_nested_section_keeps_the_methods_own_defaults():
    # OSD-IRF defaults to a 16x16 grid although BackboneConfig's class default is 32.
    config = method_config("osd_irf", {"backbone": {"layers": [1, 2]}})
    assert config.backbone.grid_size == 16


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tt": 1}, "unknown config key 'tt'"),
        ({"train": {"stepz": 1}}, "unknown config key 'train.stepz'"),
        ({"t": "soon"}, "'t' must be an integer"),
        ({"t": 5000}, "t must be in [0, 999]"),
        ({"scoring": "two_step"}, "'scoring' must be one of"),
        ({"backbone": {"image_size": 100}}, "multiple of 32"),
    ],
)
def test_bad_config_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        method_config("osd_irf", data)


def test_unknown_method_is_named():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        method_config("nope")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])


def test_config_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_file(str(path))
    path.write_text("train: {steps: 3}\n")
    assert load_file(str(path)) == {"train": {"steps": 3}}


def test_from_dict_rejects_non_mapping_sections():
    from ray_ad.methods.osd_irf import OSDIRFConfig

    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        from_dict(OSDIRFConfig, {"train": 3})


def test_overrides_given_as_a_mapping_are_set_as_they_are():
    base = {"train": {"lr": 0.1}}
    data = apply_overrides(base, {"train.lr": 5e-4, "fields.timesteps": [400, 200], "t": "250"})
    assert data == {"train": {"lr": 5e-4}, "fields": {"timesteps": [400, 200]}, "t": "250"}  # no YAML parsing
    assert base == {"train": {"lr": 0.1}}  # a copy


def test_a_value_where_a_section_is_expected_is_named():
    with pytest.raises(ConfigError, match="override 't.x=1': 't' is not a section"):
        apply_overrides({"t": 3}, ["t.x=1"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, {"train..lr": 1})


def test_set_dotted_can_fill_defaults_without_replacing_and_sections_are_named():
    data = {"train": {"lr": 0.1}}
    set_dotted(data, "train.lr", 0.5, replace=False)
    set_dotted(data, "head.lambda_sp", 0.2, replace=False)
    assert data == {"train": {"lr": 0.1}, "head": {"lambda_sp": 0.2}}
    assert override_section("gate.margin=0.1") == "gate" and override_section("t=250") == "t"
