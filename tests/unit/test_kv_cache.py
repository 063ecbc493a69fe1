"""The running batch's KV cache (kv_cache.py)."""
from __future__ import annotations



def test_running_cache_grows_in_place_and_matches_cat():
    import torch

    from deployments.llm.kv_cache import append_column as _append
    t = torch.randn(3, 2, 5, 4)
    ref = t.clone()
    earlier = None
    for step in range(70):
        col = torch.randn(3, 2, 1, 4)
        before = t
        t = _append(t, col)
        ref = torch.cat([ref, col], dim=2)
        assert torch.equal(t, ref)
        if step == 10:
            earlier, earlier_copy = before, before.clone()
        if step == 20:   # the engine trims leading columns that became padding for every row
            t, ref = t[:, :, 4:], ref[:, :, 4:]
    assert torch.equal(earlier, earlier_copy)   # appends never write inside an older view
    assert t.shape[2] == 5 + 70 - 4
