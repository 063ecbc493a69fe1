"""ingress/auth.py: static keys, the JWT matrix, per-model scopes on every endpoint, and a walk over the
app's route table so that a new route without the guard fails here."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pathlib
import re
import time

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.routing import Mount, Route

from deployments.config import AuthConfig
from ingress.auth import INCORRECT, MISSING, Authenticator, Principal, is_public
from tests.unit.test_api import CHAT, EMB, IMG, client_for, make_app, raw_client, run

SECRET = "s3cret-for-tests-only-0123456789abcdef"
ISS, AUD = "https://issuer.test", "modelhub"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**over):
    now = int(time.time())
    return {"sub": "team-a", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, **over}


def jwks(*pairs) -> str:
    keys = []
    for kid, private, alg in pairs:
        algo = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algo.to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return json.dumps({"keys": keys})


def hs_config(monkeypatch, **jwt_over) -> AuthConfig:
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)
    return AuthConfig.model_validate({"jwt": {"algorithms": ["HS256"], "secret_env": "TEST_JWT_SECRET",
                                              "issuer": ISS, "audience": [AUD], **jwt_over}})


def verify(cfg: AuthConfig, token: str) -> Principal:
    return run(Authenticator(cfg).authenticate(f"Bearer {token}"))


def refused(cfg: AuthConfig, token: str) -> str:
    with pytest.raises(Exception) as err:
        verify(cfg, token)
    assert err.value.status_code == 401
    return err.value.message


# ----------------------------------------------------------------------------- the JWT matrix

def test_valid_hs256(monkeypatch):
    cfg = hs_config(monkeypatch)
    p = verify(cfg, jwt.encode(claims(models=["fake-*"]), SECRET, algorithm="HS256"))
    assert p.subject == "team-a" and p.models == ("fake-*",)


def test_valid_rs256_with_a_pem_public_key(tmp_path, rsa_key):
    (tmp_path / "pub.pem").write_bytes(pem(rsa_key))
    cfg = AuthConfig.model_validate({"jwt": {"algorithms": ["RS256"], "public_key_file": str(tmp_path / "pub.pem"),
                                             "audience": [AUD]}})
    assert verify(cfg, jwt.encode(claims(), rsa_key, algorithm="RS256")).subject == "team-a"


def test_valid_es256_from_a_jwks_and_key_rotation(tmp_path, rsa_key, ec_key):
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("k1", ec_key, "ES256")))
    cfg = AuthConfig.model_validate({"jwt": {"algorithms": ["ES256", "RS256"], "jwks_file": str(path),
                                             "audience": [AUD], "jwks_refetch_cooldown_s": 0}})
    auth = Authenticator(cfg)
    t1 = jwt.encode(claims(sub="a"), ec_key, algorithm="ES256", headers={"kid": "k1"})
    assert run(auth.authenticate(f"Bearer {t1}")).subject == "a"
    # rotation: the issuer publishes k2 and drops k1; a token with the unknown kid makes the cache refetch
    path.write_text(jwks(("k2", rsa_key, "RS256")))
    t2 = jwt.encode(claims(sub="b"), rsa_key, algorithm="RS256", headers={"kid": "k2"})
    assert run(auth.authenticate(f"Bearer {t2}")).subject == "b"
    t3 = jwt.encode(claims(sub="c"), ec_key, algorithm="ES256", headers={"kid": "k-unknown"})
    with pytest.raises(Exception) as err:
        run(auth.authenticate(f"Bearer {t3}"))
    assert err.value.status_code == 401


def test_jwks_over_http_is_cached_and_refetched_on_an_unknown_kid(rsa_key, ec_key):
    import http.server
    import threading
    served = {"body": jwks(("k1", ec_key, "ES256")), "fetches": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served["fetches"] += 1
            body = served["body"].encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = AuthConfig.model_validate({"jwt": {"algorithms": ["ES256", "RS256"], "audience": [AUD],
                                                 "jwks_url": f"http://127.0.0.1:{server.server_port}/jwks.json",
                                                 "jwks_refetch_cooldown_s": 0}})
        auth = Authenticator(cfg)
        for sub in ("a", "b"):   # two tokens, one fetch
            t = jwt.encode(claims(sub=sub), ec_key, algorithm="ES256", headers={"kid": "k1"})
            assert run(auth.authenticate(f"Bearer {t}")).subject == sub
        assert served["fetches"] == 1
        served["body"] = jwks(("k1", ec_key, "ES256"), ("k2", rsa_key, "RS256"))   # rotation adds k2
        t2 = jwt.encode(claims(sub="c"), rsa_key, algorithm="RS256", headers={"kid": "k2"})
        assert run(auth.authenticate(f"Bearer {t2}")).subject == "c" and served["fetches"] == 2
    finally:
        server.shutdown()


# The claims are made when the test runs, from its `now`: times taken at collection would have
# passed by the time a long suite reaches this test.
@pytest.mark.parametrize("over", [
    lambda now: {"exp": now - 3600},                  # expired
    lambda now: {"nbf": now + 3600},                  # not yet valid
    lambda now: {"aud": "someone-else"},              # wrong audience
    lambda now: {"iss": "https://evil.test"},         # wrong issuer
    lambda now: {"exp": None},                        # no exp at all (required)
    lambda now: {"models": {"not": "a list"}},        # a models claim we cannot read
], ids=["expired", "not-yet-valid", "wrong-audience", "wrong-issuer", "no-exp", "unreadable-models"])
def test_refused_claims(monkeypatch, over):
    cfg = hs_config(monkeypatch)
    body = {k: v for k, v in claims(**over(int(time.time()))).items() if v is not None}
    assert refused(cfg, jwt.encode(body, SECRET, algorithm="HS256")) == INCORRECT


def test_leeway_accepts_small_clock_skew(monkeypatch):
    cfg = hs_config(monkeypatch, leeway_s=30)
    assert verify(cfg, jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")).subject == "team-a"
    assert verify(cfg, jwt.encode(claims(nbf=int(time.time()) + 5), SECRET, algorithm="HS256")).subject == "team-a"


def test_wrong_secret_and_alg_none_are_refused(monkeypatch):
    cfg = hs_config(monkeypatch)
    assert refused(cfg, jwt.encode(claims(), "another-secret-of-enough-length-123", algorithm="HS256")) == INCORRECT
    assert refused(cfg, jwt.encode(claims(), None, algorithm="none")) == INCORRECT


def _hs_signed_with(key: bytes, payload: dict) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


def test_hs_token_signed_with_the_rs_public_key_is_refused(tmp_path, rsa_key, monkeypatch):
    (tmp_path / "pub.pem").write_bytes(pem(rsa_key))
    forged = _hs_signed_with(pem(rsa_key), claims())
    only_rs = AuthConfig.model_validate({"jwt": {"algorithms": ["RS256"], "audience": [AUD],
                                                 "public_key_file": str(tmp_path / "pub.pem")}})
    assert refused(only_rs, forged) == INCORRECT
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)   # HS and RS both allowed: HS is checked with the secret only
    both = AuthConfig.model_validate({"jwt": {"algorithms": ["HS256", "RS256"], "audience": [AUD],
                                              "secret_env": "TEST_JWT_SECRET",
                                              "public_key_file": str(tmp_path / "pub.pem")}})
    assert refused(both, forged) == INCORRECT


@pytest.mark.parametrize("token", ["a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "eyJ.eyJ.sig", "not-a-token", "x" * 5000])
def test_malformed_tokens_are_refused(monkeypatch, token):
    assert refused(hs_config(monkeypatch), token) == INCORRECT


def test_limits_from_a_claim(monkeypatch):
    cfg = hs_config(monkeypatch, limits_claim="rl")
    p = verify(cfg, jwt.encode(claims(rl={"requests_per_minute": 7}), SECRET, algorithm="HS256"))
    assert p.limits.requests_per_minute == 7


def test_limits_without_credentials_are_a_config_error():
    with pytest.raises(ValueError, match="need credentials"):
        AuthConfig.model_validate({"limits": {"requests_per_minute": 5}})


def test_config_refuses_algorithms_without_keys():
    with pytest.raises(ValueError):
        AuthConfig.model_validate({"jwt": {"algorithms": ["RS256"]}})
    with pytest.raises(ValueError):
        AuthConfig.model_validate({"jwt": {"algorithms": ["none"], "secret_env": "X"}})


# ----------------------------------------------------------------------------- static keys

def test_static_keys_from_env_file_and_hashed_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k-env")
    (tmp_path / "keys").write_text("# comment\nk-file\n\n")
    cfg = AuthConfig.model_validate({"api_keys_env": "TEST_KEYS", "api_keys_file": str(tmp_path / "keys"),
                                     "keys": [{"sha256": hashlib.sha256(b"k-team").hexdigest(), "subject": "team-b",
                                               "models": [CHAT], "limits": {"requests_per_minute": 5}}]})
    auth = Authenticator(cfg)
    assert run(auth.authenticate("Bearer k-env")).subject.startswith("key-")
    assert run(auth.authenticate("bearer k-file")).models == ("*",)
    team = run(auth.authenticate("Bearer k-team"))
    assert (team.subject, team.models, team.limits.requests_per_minute) == ("team-b", (CHAT,), 5)
    assert "k-env" not in repr(vars(auth.keys))   # kept only as hashes


def test_without_credentials_auth_is_off_and_the_startup_log_says_so(caplog):
    auth = Authenticator(AuthConfig())
    assert not auth.enabled and run(auth.authenticate("")).subject == "anonymous"
    with caplog.at_level("WARNING", logger="modelhub.ingress"):
        make_app()
    assert any("AUTH IS OFF" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# ----------------------------------------------------------------------------- over HTTP

def keyed_app(**kw):
    import os
    os.environ["TEST_MODELHUB_KEYS"] = "k1"
    return make_app(auth=AuthConfig(api_keys_env="TEST_MODELHUB_KEYS",
                                    keys=[{"sha256": hashlib.sha256(b"chat-only").hexdigest(), "subject": "t",
                                           "models": ["fake-c*"]}]), **kw)


def test_401_bodies_are_openai_shaped_and_say_nothing_more():
    app = keyed_app()

    async def go():
        async with raw_client(app) as h:
            return [await h.get("/v1/models", headers=hdr) for hdr in
                    ({}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer wrong"},
                     {"Authorization": "Bearer a.b.c"})]
    missing, basic, wrong, malformed = run(go())
    assert missing.status_code == basic.status_code == wrong.status_code == malformed.status_code == 401
    assert missing.json()["error"] == {"message": MISSING, "type": "invalid_request_error", "param": None,
                                       "code": None}
    assert wrong.json() == malformed.json() == {"error": {"message": INCORRECT, "type": "invalid_request_error",
                                                          "param": None, "code": "invalid_api_key"}}


def walk_routes(routes, prefix=""):
    """(path, method) of every endpoint, through included routers and mounts; an unknown kind of route
    fails the walk rather than being skipped."""
    for r in routes:
        if isinstance(r, Route):
            yield from ((prefix + r.path, m) for m in sorted(r.methods or ["GET"]) if m != "HEAD")
        elif hasattr(r, "original_router"):      # FastAPI's included router
            yield from walk_routes(r.original_router.routes, prefix + r.include_context.prefix)
        elif isinstance(r, Mount):
            yield from walk_routes(r.routes, prefix + r.path)
        else:
            raise AssertionError(f"the route walk does not know {type(r).__name__}")


def _concrete(path: str) -> str:
    import re
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_is_guarded_except_the_public_ones():
    """Walks the route table: a route added later without thought fails here."""
    app = keyed_app()
    public = {"/health", "/ready", "/v1/images/files/{name}"}
    routes = list(walk_routes(app.routes))
    assert {"/docs", "/openapi.json", "/v1/models", "/v1/chat/completions"} <= {p for p, _ in routes}

    async def go():
        async with raw_client(app) as h:
            return [(p, m, (await h.request(m, _concrete(p), json={})).status_code) for p, m in routes]
    for path, method, status in run(go()):
        if path in public:
            assert status != 401, (method, path)
        else:
            assert status == 401, (method, path, status)


def test_public_paths_below_a_route_prefix():
    assert is_public({"path": "/health"}) and is_public({"path": "/v1/images/files/abc.png"})
    assert is_public({"path": "/hub/ready", "root_path": "/hub"})
    assert is_public({"path": "/hub/v1/images/files/abc.png", "root_path": "/hub"})
    assert not is_public({"path": "/v1/images/files/a/../../models"})
    assert not is_public({"path": "/hub/v1/models", "root_path": "/hub"})
    assert not is_public({"path": "/healthz"})


SCOPED_CALLS = [
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("post", "/v1/completions", {"prompt": "x"}),
    ("post", "/v1/embeddings", {"input": "x"}),
    ("post", "/v1/images/generations", {"prompt": "x", "response_format": "b64_json"}),
]


def test_scopes_on_every_endpoint_look_like_absent_models():
    app = keyed_app()
    auth = {"Authorization": "Bearer chat-only"}   # may use fake-c* only

    async def go():
        async with raw_client(app) as h:
            listed = (await h.get("/v1/models", headers=auth)).json()
            out = {"list": [m["id"] for m in listed["data"]]}
            for model in (CHAT, EMB, IMG, "absent"):
                out[("get", model)] = await h.get(f"/v1/models/{model}", headers=auth)
            for method, path, body in SCOPED_CALLS:
                for model in (EMB, IMG, "absent"):
                    out[(path, model)] = await h.post(path, json={**body, "model": model}, headers=auth)
            out["chat"] = await h.post("/v1/chat/completions", json={**SCOPED_CALLS[0][2], "model": CHAT},
                                       headers=auth)
            out["image-default"] = await h.post("/v1/images/generations", json={"prompt": "x"}, headers=auth)
            return out
    out = run(go())
    assert out["list"] == [CHAT]
    assert out[("get", CHAT)].status_code == 200 and out["chat"].status_code == 200
    for model in (EMB, IMG):
        hidden, absent = out[("get", model)], out[("get", "absent")]
        assert hidden.status_code == absent.status_code == 404
        assert hidden.json()["error"]["message"].replace(model, "M") == absent.json()["error"]["message"].replace(
            "absent", "M")
    for _, path, _ in SCOPED_CALLS:
        for model in (EMB, IMG):
            hidden, absent = out[(path, model)].json()["error"], out[(path, "absent")].json()["error"]
            assert out[(path, model)].status_code == 404, (path, model)
            assert hidden["code"] == absent["code"] == "model_not_found"
            assert hidden["message"].replace(model, "M") == absent["message"].replace("absent", "M")
    assert out["image-default"].status_code == 404   # no image model in scope to default to


def test_openai_client_with_a_key_sees_everything_in_scope():
    app = keyed_app()

    async def go():
        return [m.id for m in (await client_for(app, api_key="k1").models.list()).data]
    assert run(go()) == [CHAT, EMB, IMG]


# ----------------------------------------------------------------------------- docs/auth.md

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "auth.md").read_text()


def test_the_docs_config_examples_are_valid_config(monkeypatch, tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        AuthConfig.model_validate(yaml.safe_load(block)["ingress"]["auth"])


def test_the_docs_three_line_token_is_accepted_by_the_docs_hs_config(monkeypatch):
    mint = re.search(r"```python\n(.*?)```", DOC, re.S).group(1)
    assert len(mint.strip().splitlines()) == 3
    scope = {"SECRET": SECRET}
    exec(mint, scope)
    monkeypatch.setenv("MODELHUB_JWT_SECRET", SECRET)
    hs = next(b for b in re.findall(r"```yaml\n(.*?)```", DOC, re.S) if "HS256" in b)
    cfg = AuthConfig.model_validate(yaml.safe_load(hs)["ingress"]["auth"])
    cfg.jwt.issuer = None   # the example token carries no iss
    assert verify(cfg, scope["token"]).subject == "team-a"
