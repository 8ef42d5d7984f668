"""divdr: Dynamic Routing (DR) and Diversified Dynamic Routing (DivDR) networks in pure PyTorch.

The public API, in the order one meets it::

    from divdr import get_model_config, DynamicRoutingSegmenter, cost_table, real_cost, total_loss
    model = DynamicRoutingSegmenter(get_model_config("tiny", num_classes=19))
    out = model(images)                      # out.logits, out.backbone.{features, gates, activations}
    gflops = real_cost(out.backbone.gates, cost_table(model.config, *images.shape[-2:])) / 1e9

Datasets live in ``divdr.data``, metrics in ``divdr.metrics`` / ``divdr.coco_eval``, K-means helpers in
``divdr.clustering``. This package never imports ray or mlflow.
"""

from divdr.backbone import BackboneOutput, DynamicBackbone
from divdr.config import (
    MODEL_SIZES,
    PRESETS,
    BudgetConfig,
    ClusteringConfig,
    ConfigError,
    GateConfig,
    ModelConfig,
    Preset,
    get_model_config,
    get_preset,
)
from divdr.flops import budget_ratio, cost_table, expected_cost, real_cost
from divdr.heads import DynamicRoutingSegmenter, SegmentationOutput
from divdr.losses import budget_loss, clustering_loss, total_loss

__all__ = [
    "MODEL_SIZES", "PRESETS", "BackboneOutput", "BudgetConfig", "ClusteringConfig", "ConfigError",
    "DynamicBackbone", "DynamicRoutingSegmenter", "GateConfig", "ModelConfig", "Preset", "SegmentationOutput",
    "budget_loss", "budget_ratio", "clustering_loss", "cost_table", "expected_cost", "get_model_config",
    "get_preset", "real_cost", "total_loss",
]
