"""divdr.config: values coming from YAML / --set are checked by name before a config is built."""

import pytest

from divdr.config import ClusteringConfig, ConfigError, config_from_dict


def test_one_cluster_with_the_clustering_loss_on_is_refused():
    with pytest.raises(ConfigError, match=r"clustering\.k must be >= 2 .*clustering\.weight"):
        ClusteringConfig(weight=0.5, k=1, alpha=1.0)
    with pytest.raises(ConfigError, match=r"clustering\.k must be >= 2"):
        config_from_dict(ClusteringConfig, {"weight": 0.5, "k": 1}, where="clustering")
    # DR measuring a single cluster trains nothing against it: Inter is NaN by definition, harmless
    assert ClusteringConfig(weight=0.0, k=1).k == 1
