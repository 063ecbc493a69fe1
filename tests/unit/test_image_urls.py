"""ingress/image_urls.py over HTTP: signed image URLs, tampered, expired, and verified by another
ingress (a second app: another replica, or this one after a restart) sharing the store and secret."""
from __future__ import annotations

import hashlib
import urllib.parse

import pytest

from deployments.config import AuthConfig
from tests.unit.fakes import FakeImageStore
from tests.unit.test_api import IMG, make_app, raw_client, run


@pytest.fixture
def signed_apps(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k")
    monkeypatch.setenv("TEST_URL_SECRET", "url-secret-0123456789")
    store = FakeImageStore()
    cfg = AuthConfig(api_keys_env="TEST_KEYS", image_url_secret_env="TEST_URL_SECRET")
    return make_app(auth=cfg, store=store), make_app(auth=cfg, store=store), store


def fetch(app, url: str):
    async def go():
        async with raw_client(app) as h:
            return await h.get(url.removeprefix("http://test"))
    return run(go())


def make_url(app, n=1) -> list[str]:
    async def go():
        async with raw_client(app) as h:
            r = await h.post("/v1/images/generations", json={"model": IMG, "prompt": "p", "n": n},
                             headers={"Authorization": "Bearer k"})
            return [d["url"] for d in r.json()["data"]]
    return run(go())


def test_a_signed_url_works_without_credentials_on_any_replica(signed_apps):
    one, other, _ = signed_apps
    url = make_url(one)[0]
    assert "expires=" in url and "signature=" in url
    assert fetch(one, url).status_code == 200
    assert fetch(other, url).status_code == 200     # another replica, or this one restarted


def tamper(url: str, **change) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(change)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def test_tampered_and_expired_urls_are_404(signed_apps):
    one, _, store = signed_apps
    url = make_url(one)[0]
    exp = int(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["expires"])
    for bad in (tamper(url, expires=str(exp + 3600)), tamper(url, signature="A" * 43), url.split("?")[0],
                tamper(url, expires="1"), tamper(url, expires="abc")):
        r = fetch(one, bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad


def test_an_expired_signature_is_refused_even_while_the_image_is_kept(signed_apps, monkeypatch):
    one, _, _ = signed_apps
    url = make_url(one)[0]
    import ingress.image_urls as mod
    later = mod.time.time() + 7200
    monkeypatch.setattr(mod.time, "time", lambda: later)
    assert fetch(one, url).status_code == 404


def test_without_a_configured_secret_the_stores_secret_signs(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k")
    store = FakeImageStore()
    cfg = AuthConfig(api_keys_env="TEST_KEYS")
    one, other = make_app(auth=cfg, store=store), make_app(auth=cfg, store=store)
    url = make_url(one)[0]
    assert fetch(other, url).status_code == 200
    assert fetch(other, tamper(url, signature="x")).status_code == 404


def test_images_are_stored_under_the_callers_subject(signed_apps):
    one, _, store = signed_apps
    make_url(one, n=2)
    subject = "key-" + hashlib.sha256(b"k").hexdigest()[:12]
    assert list(store.store.usage()) == [subject]
