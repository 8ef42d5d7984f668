"""divdr.data.labels: train ids back to labelIds (the benchmark's prediction format) and their colours."""

import numpy as np
import pytest

from divdr.data.labels import (
    IGNORE_INDEX,
    LABEL_ID_BY_NAME,
    NUM_CLASSES,
    TRAIN_ID_COLOURS,
    LabelError,
    colourise,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)


def test_train_ids_go_back_to_their_label_ids_and_no_prediction_to_unlabeled():
    train = np.array([[0, 13, 18], [IGNORE_INDEX, 10, 5]], np.uint8)
    label_ids = train_ids_to_label_ids(train)
    assert label_ids.dtype == np.uint8
    assert label_ids.tolist() == [[LABEL_ID_BY_NAME["road"], LABEL_ID_BY_NAME["car"], LABEL_ID_BY_NAME["bicycle"]],
                                  [LABEL_ID_BY_NAME["unlabeled"], LABEL_ID_BY_NAME["sky"], LABEL_ID_BY_NAME["pole"]]]
    every = np.arange(NUM_CLASSES)
    assert np.array_equal(label_ids_to_train_ids(train_ids_to_label_ids(every)), every)


def test_values_that_are_no_train_id_are_refused():
    with pytest.raises(LabelError, match=r"\[19, 200\]"):
        train_ids_to_label_ids(np.array([1, 19, 200], np.uint8))
    with pytest.raises(LabelError, match=r"\[-1\]"):
        train_ids_to_label_ids(np.array([-1, 0]))


def test_colourise_uses_the_cityscapes_colours_and_black_for_no_prediction():
    colours = colourise(np.array([[0, 13, IGNORE_INDEX]], np.uint8))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [[128, 64, 128], [0, 0, 142], [0, 0, 0]]
    assert len(set(TRAIN_ID_COLOURS)) == NUM_CLASSES  # every class its own colour
