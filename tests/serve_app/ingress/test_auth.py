"""Identity only from verified credentials: API keys (file and Redis stores), JWTs against a JWKS,
WebSocket tickets, the trusted proxy's header, and the explicit no-auth mode. No Serve needed: the
authenticator is driven with ASGI scopes."""

import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import HTTPConnection

from serve_app.config import AuthSettings
from serve_app.errors import ApiError
from serve_app.ingress.auth import Authenticator, Identity, TicketSigner
from serve_app.ingress.keys import FileKeyStore, RedisKeyStore, hash_key, new_key, revoke, verify
from serve_app.redis_client import connect

from ...apps import AUDIENCE, ISSUER, JWKS_FILE, token_for


def conn(headers: dict | None = None, query: str = "", kind: str = "http") -> HTTPConnection:
    return HTTPConnection({"type": kind, "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
                           "query_string": query.encode(), "path": "/", "method": "GET"})


def bearer(credential: str) -> dict:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture(params=["file", "redis"])
async def key_store(request, tmp_path, redis_prefix):
    if request.param == "file":
        yield FileKeyStore(tmp_path / "keys.json")
        return
    client = connect(request.getfixturevalue("redis_url"))
    yield RedisKeyStore(client, redis_prefix)
    await client.aclose()


async def test_a_key_is_stored_hashed_verifies_and_is_revoked(key_store):
    key, record = new_key("alice", admin=False, name="laptop")
    await key_store.put(record)
    assert record.hash == hash_key(key) and key not in json.dumps(record.model_dump())
    assert (await verify(key, [key_store])).user == "alice"
    assert await verify(key[:-1] + ("A" if key[-1] != "A" else "B"), [key_store]) is None  # one character off
    assert await verify("cs-000000000000-" + "x" * 43, [key_store]) is None  # unknown id
    assert await verify("not-a-key", [key_store]) is None
    assert await revoke(record.id, [key_store]) and not await revoke("ffffffffffff", [key_store])
    assert await verify(key, [key_store]) is None
    assert [r.revoked_at is not None for r in await key_store.all()] == [True]


def test_the_keys_file_is_private_and_changes_are_seen(tmp_path):
    path = tmp_path / "keys.json"
    writer, reader = FileKeyStore(path), FileKeyStore(path)
    _, first = new_key("alice")
    writer.write(first)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert [r.id for r in reader.load_now().values()] == [first.id]
    _, second = new_key("bob")
    writer.write(second)
    assert set(reader.load_now()) == {first.id, second.id}


async def test_api_keys_name_the_user_and_carry_their_quota(tmp_path):
    store = FileKeyStore(tmp_path / "keys.json")
    key, record = new_key("alice", admin=True, max_concurrent_replies=2)
    store.write(record)
    auth = Authenticator(AuthSettings(), [store], TicketSigner())
    who = await auth.identify(conn(bearer(key)))
    assert (who.owner, who.user, who.admin, who.via, who.max_concurrent_replies) == ("user:alice", "alice", True, "key", 2)


@pytest.mark.parametrize("headers, needle", [
    ({}, "missing credentials"),
    (bearer("cs-aaaaaaaaaaaa-" + "b" * 43), "invalid or revoked API key"),
    ({"Authorization": "Basic YWxpY2U6cHc="}, "Bearer"),
    ({"X-User-Id": "alice"}, "missing credentials"),  # a header never names the caller
    (bearer("some.random.string"), "invalid API key"),  # no JWT provider configured
])
async def test_without_a_verified_credential_it_is_401(tmp_path, headers, needle):
    auth = Authenticator(AuthSettings(), [FileKeyStore(tmp_path / "none.json")], TicketSigner())
    with pytest.raises(ApiError, match=needle) as refused:
        await auth.identify(conn(headers))
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"


def jwt_auth(tmp_path, **overrides) -> Authenticator:
    settings = AuthSettings(jwt={"jwks_file": str(JWKS_FILE), "issuer": ISSUER, "audience": AUDIENCE,
                                 "admin_users": ["root"], **overrides})
    return Authenticator(settings, [FileKeyStore(tmp_path / "none.json")], TicketSigner())


async def test_jwts_are_verified_against_the_jwks(tmp_path):
    auth = jwt_auth(tmp_path)
    who = await auth.identify(conn(bearer(token_for("alice"))))
    assert (who.owner, who.admin, who.via) == ("oidc:alice", False, "jwt")
    assert (await auth.identify(conn(bearer(token_for("root"))))).admin
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "root", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}, stranger,
                        algorithm="RS256", headers={"kid": jwt.get_unverified_header(token_for("x"))["kid"]})
    hs256 = jwt.encode({"sub": "root", "exp": int(time.time()) + 60}, "a-shared-secret-of-32-bytes-or-more",
                       algorithm="HS256")  # a symmetric token: the JWKS's public keys cannot vouch for it
    for bad, needle in [(token_for("alice", ttl_s=-10), "expired"), (token_for("alice", iss="elsewhere"), "issuer"),
                        (token_for("alice", aud="other-api"), "audience"), (forged, "signature"),
                        (hs256, "invalid token")]:
        with pytest.raises(ApiError, match=f"(?i){needle}") as refused:
            await auth.identify(conn(bearer(bad)))
        assert refused.value.status == 401


async def test_a_jwt_without_the_user_claim_is_refused(tmp_path):
    with pytest.raises(ApiError, match="'email' claim"):
        await jwt_auth(tmp_path, user_claim="email").identify(conn(bearer(token_for("alice"))))


async def test_tickets_carry_the_identity_briefly_and_cannot_be_forged(redis_url, redis_prefix):
    client = connect(redis_url)
    try:
        issuer, other_replica = TicketSigner(client, redis_prefix), TicketSigner(client, redis_prefix)
        who = Identity("user:alice", "alice", False, "key", max_concurrent_replies=3)
        ticket = await issuer.issue(who, ttl_s=30)
        assert await other_replica.verify(ticket) == Identity("user:alice", "alice", False, "ticket", None, None, 3)
        payload, _, mac = ticket.partition(".")
        assert await issuer.verify(payload[:-2] + "xx." + mac) is None  # tampered
        assert await TicketSigner().verify(ticket) is None  # another secret
        assert await issuer.verify(await issuer.issue(who, ttl_s=-1)) is None  # expired
    finally:
        await client.aclose()


async def test_a_websocket_may_present_a_ticket_but_http_may_not(tmp_path):
    auth = jwt_auth(tmp_path)
    ticket = await auth.tickets.issue(Identity("user:bob", "bob", False, "key"), ttl_s=30)
    assert (await auth.identify(conn(query=f"ticket={ticket}", kind="websocket"))).owner == "user:bob"
    with pytest.raises(ApiError, match="missing credentials"):
        await auth.identify(conn(query=f"ticket={ticket}"))
    with pytest.raises(ApiError, match="ticket is invalid or expired"):
        await auth.identify(conn(query="ticket=forged.value", kind="websocket"))


async def test_the_proxy_header_counts_only_when_configured(tmp_path):
    store = [FileKeyStore(tmp_path / "none.json")]
    proxied = Authenticator(AuthSettings(trusted_proxy={"user_header": "X-Forwarded-User", "admin_users": ["ops"]}),
                            store, TicketSigner())
    assert (await proxied.identify(conn({"X-Forwarded-User": "carol"}))).owner == "user:carol"
    assert (await proxied.identify(conn({"X-Forwarded-User": "ops"}))).admin
    with pytest.raises(ApiError):
        await Authenticator(AuthSettings(), store, TicketSigner()).identify(conn({"X-Forwarded-User": "carol"}))


async def test_mode_none_takes_the_callers_word(tmp_path):
    auth = Authenticator(AuthSettings(mode="none"), [], TicketSigner())
    assert (await auth.identify(conn({"X-User-Id": "dave"}))).owner == "user:dave"
    assert (await auth.identify(conn(query="user=erin", kind="websocket"))).owner == "user:erin"
    assert (await auth.identify(conn())).owner == "user:anonymous"
