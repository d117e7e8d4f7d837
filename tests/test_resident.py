"""Tables copied to the device together (``resident.to_device_all``)."""

import numpy as np
import pytest
import torch

from patterncc.backends.triton.resident import to_device_all


def test_each_array_is_a_view_of_one_copy_with_its_values():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-9, 9, size).astype(np.int32) for size in (5, 0, 16, 17, 1, 40)]
    views = to_device_all(arrays, "cpu")
    assert len(views) == len(arrays)
    base = views[0]._base if views[0]._base is not None else views[0]
    for a, view in zip(arrays, views):
        assert view.dtype == torch.int32 and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        if a.size:
            assert view.tolist() == a.tolist()
        else:  # an empty table keeps one element: a pointer into the buffer, never null
            assert view.numel() == 1 and view.item() == 0


def test_every_view_keeps_the_alignment_a_table_of_its_own_has():
    """Triton specializes on 16-byte pointer alignment: each view starts a multiple of 64 bytes in."""
    views = to_device_all([np.arange(n, dtype=np.int32) for n in (1, 3, 15, 16, 17, 100)], "cpu")
    start = views[0].data_ptr()
    assert all((view.data_ptr() - start) % 64 == 0 for view in views)
    assert all(view.data_ptr() % 16 == 0 for view in views)


def test_a_mixed_dtype_set_is_refused():
    with pytest.raises(TypeError, match="one dtype"):
        to_device_all([np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int64)], "cpu")
