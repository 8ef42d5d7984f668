"""divdr.evaluation: inference over a dataset and the merge of its shards."""

import numpy as np
import pytest
import torch

from divdr.config import get_model_config
from divdr.data.cityscapes import CityscapesSegmentation
from divdr.data.study import study_config
from divdr.data.synthetic import generate
from divdr.evaluation import merge_results, run_inference
from divdr.heads import DynamicRoutingSegmenter


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "study"
    generate(study_config(2, n_train=2, n_val=6, height=64, width=128, seed=5), root)
    return CityscapesSegmentation(root, "val")


def test_merging_shards_sums_them_and_leaves_each_shard_intact(val_set):
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(get_model_config("micro"))
    whole = run_inference(net, val_set, batch_size=2)
    parts = [run_inference(net, val_set, batch_size=2, indices=idx) for idx in ([4, 5], [0, 1, 2, 3])]
    before = [p.scores.miou for p in parts]
    merged = merge_results(parts)
    assert [p.scores.miou for p in parts] == before  # a merge must not write into its inputs
    assert torch.equal(merged.confusion.matrix, whole.confusion.matrix)
    assert merged.scores.miou == pytest.approx(whole.scores.miou)
    assert np.array_equal(merged.sample_ids, np.arange(6))
    assert np.allclose(merged.activations, whole.activations, atol=1e-5)


def test_the_prediction_sink_gets_what_the_confusion_matrix_counts(val_set):
    from divdr.metrics import ConfusionMatrix

    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(get_model_config("micro"))
    seen: dict[str, torch.Tensor] = {}

    def keep(files: list[str], predicted: torch.Tensor) -> None:
        seen.update(zip(files, predicted, strict=True))

    result = run_inference(net, val_set, batch_size=4, predictions=keep)
    assert list(seen) == result.files  # every image once, in order, keyed by its file
    again = ConfusionMatrix(19)
    for index, file in enumerate(result.files):
        assert seen[file].shape == val_set[index]["label"].shape
        again.update(seen[file][None], val_set[index]["label"][None])
    assert torch.equal(again.matrix, result.confusion.matrix)


def test_each_subset_is_scored_on_its_own_images_and_the_shards_merge(val_set):
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(get_model_config("micro"))
    whole = run_inference(net, val_set, batch_size=4)  # batches that mix the subsets
    assert sorted(whole.confusion_by_subset) == sorted(set(whole.subsets.tolist())) == [0, 1]
    assert torch.equal(sum(m.matrix for m in whole.confusion_by_subset.values()), whole.confusion.matrix)
    for s, scores in whole.scores_by_subset().items():
        alone = run_inference(net, val_set, indices=np.flatnonzero(whole.subsets == s).tolist())
        assert scores.miou == pytest.approx(alone.scores.miou)
    merged = merge_results([run_inference(net, val_set, batch_size=2, indices=idx) for idx in ([0, 1, 2], [3, 4, 5])])
    for s, matrix in whole.confusion_by_subset.items():
        assert torch.equal(merged.confusion_by_subset[s].matrix, matrix.matrix)
