import pytest

from ssl_lib.config import Config, ConfigError, load_config, make_config, save_config


def test_defaults_are_the_writeups_settings():
    cfg = make_config()
    assert (cfg.w_labeled, cfg.w_augment, cfg.w_kmeans, cfg.tau, cfg.lr) == (1.0, 0.25, 0.25, 0.95, 1e-3)
    assert (cfg.batch_size, cfg.unlabeled_batch_size) == (64, 64)


def test_unknown_key_names_the_key_and_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown config key 'w_kmean'; did you mean 'w_kmeans'"):
        make_config({"w_kmean": 1.0})
    with pytest.raises(ConfigError, match="unknown config key 'zzz'"):
        make_config(overrides=["zzz=1"])


@pytest.mark.parametrize("override, field", [
    ("tau=1.5", "tau"), ("tau=-0.1", "tau"), ("w_kmeans=-1", "w_kmeans"), ("epochs=-2", "epochs"),
    ("dataset=mnist", "dataset"), ("precision=fp16", "precision"), ("batch_size=0", "batch_size"),
    ("num_unlabeled=-5", "num_unlabeled"), ("device=tpu", "device"), ("lr=0", "lr"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        make_config(overrides=[override])


def test_types_are_coerced_or_rejected():
    cfg = make_config(overrides=["num_unlabeled=5000", "compile=true", "w_kmeans=100", "name=exp"])
    assert cfg.num_unlabeled == 5000 and cfg.compile is True and cfg.w_kmeans == 100.0 and cfg.name == "exp"
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        make_config(overrides=["epochs=abc"])
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        make_config({"epochs": 2.5})
    with pytest.raises(ConfigError, match="'compile' must be bool"):
        make_config({"compile": "maybe"})
    with pytest.raises(ConfigError, match="must look like key=value"):
        make_config(overrides=["epochs"])


def test_label_budget_replaces_m_but_not_both_in_one_layer():
    cfg = make_config({"num_unlabeled": 100}, overrides=["num_labeled=250", "balanced=true"])
    assert cfg.num_unlabeled is None and cfg.num_labeled == 250 and cfg.balanced
    back = make_config({"num_labeled": 250}, overrides=["num_unlabeled=10"])
    assert back.num_unlabeled == 10 and back.num_labeled is None
    with pytest.raises(ConfigError, match="exactly one of 'num_unlabeled'"):
        make_config({"num_unlabeled": 100, "num_labeled": 250})


def test_all_zero_weights_rejected():
    with pytest.raises(ConfigError, match="must not all be 0"):
        make_config({"w_labeled": 0, "w_augment": 0, "w_kmeans": 0})


def test_yaml_roundtrip_and_digest(tmp_path):
    cfg = make_config({"name": "a", "num_unlabeled": 50, "epochs": 31})
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg and again.digest() == cfg.digest()
    # the name does not change what is computed; M does
    assert make_config({"name": "b", "num_unlabeled": 50, "epochs": 31}).digest() == cfg.digest()
    assert make_config({"name": "a", "num_unlabeled": 51, "epochs": 31}).digest() != cfg.digest()
    assert cfg.run_name() == f"a-{cfg.digest()}"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line 2, column 1"):
        load_config(broken)


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().epochs = 3  # type: ignore[misc]


def test_yaml_on_off_reach_string_fields_as_on_off():
    # YAML 1.1 reads `on`/`off` as booleans; a str field with those choices gets them back.
    assert make_config(overrides=["channels_last=on"]).channels_last == "on"
    assert make_config({"channels_last": False}).channels_last == "off"


def test_none_is_null_only_where_null_is_allowed(tmp_path):
    # labeled_view has a value spelled "none"; num_unlabeled is optional, so "none" there means null
    cfg = make_config({}, ["labeled_view=none", "num_labeled=4000", "num_unlabeled=none"])
    assert cfg.labeled_view == "none" and cfg.num_unlabeled is None and cfg.num_labeled == 4000
    path = tmp_path / "c.yaml"
    path.write_text("labeled_view: none\n")
    assert load_config(path).labeled_view == "none"
    with pytest.raises(ConfigError, match="labeled_view"):
        make_config({"labeled_view": None})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        make_config({}, ["epochs=none"])
