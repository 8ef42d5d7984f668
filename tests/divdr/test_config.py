"""divdr.config: values coming from YAML / --set are checked by name before a config is built."""

import math

import pytest

from divdr.config import ClusteringConfig, ConfigError, GateConfig, ModelConfig, config_from_dict
from divdr.detection import DetectionConfig


def test_one_cluster_with_the_clustering_loss_on_is_refused():
    with pytest.raises(ConfigError, match=r"clustering\.k must be >= 2 .*clustering\.weight"):
        ClusteringConfig(weight=0.5, k=1, alpha=1.0)
    with pytest.raises(ConfigError, match=r"clustering\.k must be >= 2"):
        config_from_dict(ClusteringConfig, {"weight": 0.5, "k": 1}, where="clustering")
    # DR measuring a single cluster trains nothing against it: Inter is NaN by definition, harmless
    assert ClusteringConfig(weight=0.0, k=1).k == 1


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan", "1e400"])
@pytest.mark.parametrize(("cls", "key"), [(ClusteringConfig, "k"), (ClusteringConfig, "update_every"),
                                          (ModelConfig, "channels")])
def test_non_finite_integers_are_refused_by_name(cls, key, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{key} must be a finite number"):
        config_from_dict(cls, {key: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "-inf", "nan"])
@pytest.mark.parametrize(("cls", "key"), [(ClusteringConfig, "alpha"), (ClusteringConfig, "weight"),
                                          (GateConfig, "bias_init"), (DetectionConfig, "box_score_thresh")])
def test_non_finite_floats_are_refused_by_name(cls, key, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{key} must be a finite number"):
        config_from_dict(cls, {key: value})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("anchor_sizes", ["a", "b", "c", "d", "e"], r"detection\.anchor_sizes\[0\] must be a number, got 'a'"),
    ("anchor_sizes", [8, 16, 32.5, 64, 128], r"detection\.anchor_sizes\[2\] must be an integer, got 32\.5"),
    ("anchor_sizes", [8, 16, True, 64, 128], r"detection\.anchor_sizes\[2\] must be a number, got True"),
    ("aspect_ratios", [0.5, "x"], r"detection\.aspect_ratios\[1\] must be a number, got 'x'"),
    ("aspect_ratios", [0.5, float("nan")], r"detection\.aspect_ratios\[1\] must be a finite number"),
    ("mask_head_layers", [64, [1]], r"detection\.mask_head_layers\[1\] must be a number, got \[1\]"),
])
def test_list_items_are_checked_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(DetectionConfig, {key: value}, where="detection")
    assert repr(value) in str(info.value)  # the whole list, as given


def test_list_items_in_yaml_spellings_are_forgiven():
    cfg = config_from_dict(DetectionConfig, {"anchor_sizes": [8.0, "16", 32, 64, 128], "aspect_ratios": [1, "2"]})
    assert cfg.anchor_sizes == (8, 16, 32, 64, 128) and all(isinstance(s, int) for s in cfg.anchor_sizes)
    assert cfg.aspect_ratios == (1.0, 2.0)
    assert config_from_dict(ModelConfig, {"route": [0, 2.0]}).route == (0, 2)
    with pytest.raises(ConfigError, match=r"model\.route\[0\] must be a number, got 'a'"):
        config_from_dict(ModelConfig, {"route": ["a"]}, where="model")
