"""deployments/images/store.py: expiry, the overall bound, and per-subject quotas (one subject's
images never push out another's)."""
from __future__ import annotations

import pytest

from deployments.errors import OverloadedError
from deployments.images.store import ImageStore


def test_get_until_expiry(monkeypatch):
    import deployments.images.store as mod
    s = ImageStore(ttl_s=10)
    (token, expires), = s.put([b"png"], "a")
    assert s.get(token) == b"png" and s.get("nope") is None
    later = expires + 1
    monkeypatch.setattr(mod.time, "time", lambda: later)
    assert s.get(token) is None
    s.put([b"x"], "b")              # expired entries are dropped on the next put
    assert s.usage() == {"b": 1}


def test_over_its_quota_a_subject_loses_its_own_oldest_images_only():
    s = ImageStore(max_bytes=100, quota_bytes=40)
    theirs = [t for t, _ in s.put([b"b" * 10] * 3, "b")]
    mine = [t for t, _ in s.put([b"a" * 10] * 4, "a")]
    newer = [t for t, _ in s.put([b"a" * 10] * 2, "a")]
    assert s.usage() == {"b": 30, "a": 40}
    assert [s.get(t) is None for t in mine] == [True, True, False, False]
    assert all(s.get(t) for t in theirs + newer)


def test_a_full_store_refuses_rather_than_evicting_another_subject():
    s = ImageStore(max_bytes=50, quota_bytes=30)
    s.put([b"b" * 30], "b")
    s.put([b"c" * 20], "c")
    with pytest.raises(OverloadedError) as err:
        s.put([b"a" * 10], "a")
    assert err.value.status_code == 503 and "Retry-After" in err.value.headers
    assert s.usage() == {"b": 30, "c": 20}


def test_images_larger_than_a_quota_are_refused():
    with pytest.raises(OverloadedError):
        ImageStore(max_bytes=100, quota_bytes=10).put([b"x" * 11], "a")
