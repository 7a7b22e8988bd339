"""The quickstart's OAuth2 endpoints through two client libraries no one here wrote.

Run by scripts/oauth-clients.sh, which starts the quickstart and passes, in the environment:
URL (http://127.0.0.1:PORT), CLIENT_ID and CLIENT_SECRET (a client with scope `read`).

- requests-oauthlib (over oauthlib): BackendApplicationClient + OAuth2Session.fetch_token,
  then the API through the session;
- Authlib: OAuth2Session with client_secret_basic: fetch_token, the API, introspect_token,
  revoke_token, introspection and the API after the revocation;
- errors as each library reports them: a wrong secret (invalid_client; the raw answer a 401
  asking for Basic) and a scope the client may not ask for (invalid_scope).

Each check asserts. Prints one line per check and `N passed, N failed`; exits 1 on any failure.
"""

import os
import sys
import traceback

URL = os.environ["URL"].rstrip("/")
CLIENT_ID = os.environ["CLIENT_ID"]
CLIENT_SECRET = os.environ["CLIENT_SECRET"]
TOKEN_URL = URL + "/oauth/token"
REVOKE_URL = URL + "/oauth/revoke"
INTROSPECT_URL = URL + "/oauth/introspect"
HEALTH_URL = URL + "/v1/health"

# oauthlib refuses plain http unless told: the quickstart listens on loopback only.
os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"

from authlib.integrations.requests_client import OAuth2Session as AuthlibSession  # noqa: E402
from authlib.integrations.requests_client import OAuthError as AuthlibError  # noqa: E402
from oauthlib.oauth2 import BackendApplicationClient  # noqa: E402
from oauthlib.oauth2.rfc6749 import errors as oauthlib_errors  # noqa: E402
from requests_oauthlib import OAuth2Session  # noqa: E402

TIMEOUT = 10
passed, failed = [], []


def show(response):
    """A response, for an assertion message."""
    headers = "".join(f"\n  {k}: {v}" for k, v in response.headers.items())
    return f"{response.request.method} {response.request.url} -> {response.status_code}{headers}\n  {response.text[:500]}"


def check(name, steps):
    """Runs `steps` (functions sharing one dict) in order: one line each; after a failure, the
    later steps of the group are counted as failed, not run."""
    state = {}
    broken = None
    for label, step in steps:
        title = f"{name}: {label}"
        if broken:
            failed.append(title)
            print(f"FAIL {title} (not run: {broken} failed)")
            continue
        try:
            step(state)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then counted
            failed.append(title)
            broken = label
            print(f"FAIL {title}")
            detail = str(error) if isinstance(error, AssertionError) else traceback.format_exc()
            for line in detail.rstrip().splitlines():
                print(f"     {line}")
        else:
            passed.append(title)
            print(f"ok   {title}")


def token_answer_headers(response):
    assert response.status_code == 200, show(response)
    assert response.headers.get("Cache-Control") == "no-store", show(response)
    assert response.headers.get("Pragma") == "no-cache", show(response)
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    assert content_type == "application/json", show(response)


def bearer_token(token, library):
    assert token.get("expires_in") == 3600, f"{library}: expires_in {token.get('expires_in')!r}"
    assert str(token.get("token_type", "")).lower() == "bearer", f"{library}: token_type {token.get('token_type')!r}"
    assert "refresh_token" not in token, f"{library}: a refresh token for client credentials: {token!r}"
    assert token.get("access_token"), f"{library}: no access_token in {token!r}"


# --- requests-oauthlib ------------------------------------------------------------------------


def ro_session(state, scope=("read",)):
    """A requests-oauthlib session as its docs show for the client credentials grant; the raw
    token answer kept by a compliance hook (the library's way to see the response).

    The scope goes on the oauthlib client: OAuth2Session(scope=...) alone is not sent in the
    token request of this grant (the server then grants all the client's scopes, and oauthlib
    warns that the scope changed)."""
    client = BackendApplicationClient(client_id=CLIENT_ID, scope=list(scope))
    session = OAuth2Session(client=client)

    def keep(response):
        state["raw"] = response
        return response

    session.register_compliance_hook("access_token_response", keep)
    return session


def ro_fetch(state):
    session = ro_session(state)
    state["token"] = session.fetch_token(token_url=TOKEN_URL, client_secret=CLIENT_SECRET, timeout=TIMEOUT)
    state["session"] = session
    raw = state["raw"]
    # The library sends the client's credentials as HTTP Basic, and no secret in the body.
    assert raw.request.headers.get("Authorization", "").startswith("Basic "), show(raw)
    body = raw.request.body or ""
    assert "client_secret" not in body, body
    assert "grant_type=client_credentials" in body.split("&"), body
    assert "scope=read" in body.split("&"), body


def ro_token(state):
    token = state["token"]
    bearer_token(token, "requests-oauthlib")
    assert token.get("scope") == ["read"], f"scope {token.get('scope')!r}"
    assert state["session"].authorized


def ro_headers(state):
    token_answer_headers(state["raw"])


def ro_api(state):
    response = state["session"].get(HEALTH_URL, timeout=TIMEOUT)
    assert response.status_code == 200, show(response)
    assert response.request.headers["Authorization"] == "Bearer " + state["token"]["access_token"]
    assert response.json() == {"status": "ok"}, show(response)


def ro_wrong_secret(state):
    session = ro_session(state)
    try:
        session.fetch_token(token_url=TOKEN_URL, client_secret=CLIENT_SECRET + "x", timeout=TIMEOUT)
    except oauthlib_errors.OAuth2Error as error:
        assert error.error == "invalid_client", f"{type(error).__name__}: {error.error!r}"
        assert isinstance(error, oauthlib_errors.InvalidClientError), type(error).__name__
    else:
        raise AssertionError("a wrong secret got a token")
    raw = state["raw"]
    assert raw.status_code == 401, show(raw)
    assert raw.headers.get("WWW-Authenticate", "").startswith("Basic "), show(raw)
    assert raw.headers.get("Cache-Control") == "no-store", show(raw)
    assert raw.json().get("error") == "invalid_client", show(raw)


def ro_unknown_scope(state):
    session = ro_session(state, scope=("read", "admin"))
    try:
        session.fetch_token(token_url=TOKEN_URL, client_secret=CLIENT_SECRET, timeout=TIMEOUT)
    except oauthlib_errors.OAuth2Error as error:
        assert error.error == "invalid_scope", f"{type(error).__name__}: {error.error!r}"
        assert isinstance(error, oauthlib_errors.InvalidScopeError), type(error).__name__
    else:
        raise AssertionError("a scope the client may not ask for was granted")
    raw = state["raw"]
    assert "scope=read+admin" in (raw.request.body or "").split("&"), raw.request.body
    assert raw.status_code == 400, show(raw)


# --- Authlib ----------------------------------------------------------------------------------


def al_session(state, secret=CLIENT_SECRET, scope="read"):
    """An Authlib session; the raw token answer kept by a requests response hook (Authlib's
    session is a requests.Session)."""
    session = AuthlibSession(
        CLIENT_ID, secret, token_endpoint_auth_method="client_secret_basic", scope=scope
    )

    def keep(response, *args, **kwargs):
        if response.request.url == TOKEN_URL:
            state["raw"] = response

    session.hooks["response"].append(keep)
    return session


def al_fetch(state):
    session = al_session(state)
    state["token"] = session.fetch_token(TOKEN_URL, grant_type="client_credentials", timeout=TIMEOUT)
    state["session"] = session
    raw = state["raw"]
    assert raw.request.headers.get("Authorization", "").startswith("Basic "), show(raw)
    body = raw.request.body or ""
    body = body.decode() if isinstance(body, bytes) else body
    assert "client_secret" not in body, body
    assert "scope=read" in body.split("&"), body
    token_answer_headers(raw)


def al_token(state):
    token = state["token"]
    bearer_token(token, "Authlib")
    assert token.get("scope") == "read", f"scope {token.get('scope')!r}"
    assert not token.is_expired(), token
    # Authlib works out expires_at from expires_in.
    assert token.get("expires_at"), token


def al_api(state):
    response = state["session"].get(HEALTH_URL, timeout=TIMEOUT)
    assert response.status_code == 200, show(response)
    assert response.request.headers["Authorization"] == "Bearer " + state["token"]["access_token"]
    assert response.json() == {"status": "ok"}, show(response)


def al_introspect(state):
    response = state["session"].introspect_token(
        INTROSPECT_URL, token=state["token"]["access_token"], token_type_hint="access_token", timeout=TIMEOUT
    )
    assert response.status_code == 200, show(response)
    assert response.headers.get("Cache-Control") == "no-store", show(response)
    body = response.json()
    assert body.get("active") is True, body
    assert body.get("scope") == "read", body
    assert body.get("client_id") == CLIENT_ID, body
    if "token_type" in body:
        assert str(body["token_type"]).lower() == "bearer", body
    if "exp" in body and "iat" in body:
        assert body["exp"] - body["iat"] == 3600, body


def al_revoke(state):
    response = state["session"].revoke_token(
        REVOKE_URL, token=state["token"]["access_token"], token_type_hint="access_token", timeout=TIMEOUT
    )
    assert response.status_code == 200, show(response)


def al_introspect_revoked(state):
    response = state["session"].introspect_token(
        INTROSPECT_URL, token=state["token"]["access_token"], timeout=TIMEOUT
    )
    assert response.status_code == 200, show(response)
    assert response.json() == {"active": False}, show(response)


def al_api_refused(state):
    response = state["session"].get(HEALTH_URL, timeout=TIMEOUT)
    assert response.status_code == 401, show(response)
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), show(response)
    assert "invalid_api_key" in response.text, show(response)


def al_wrong_secret(state):
    session = al_session(state, secret=CLIENT_SECRET + "x")
    try:
        session.fetch_token(TOKEN_URL, grant_type="client_credentials", timeout=TIMEOUT)
    except AuthlibError as error:
        assert error.error == "invalid_client", f"{type(error).__name__}: {error.error!r}"
    else:
        raise AssertionError("a wrong secret got a token")
    raw = state["raw"]
    assert raw.status_code == 401, show(raw)
    assert raw.headers.get("WWW-Authenticate", "").startswith("Basic "), show(raw)
    assert raw.json().get("error") == "invalid_client", show(raw)


def al_unknown_scope(state):
    session = al_session(state, scope="read admin")
    try:
        session.fetch_token(TOKEN_URL, grant_type="client_credentials", timeout=TIMEOUT)
    except AuthlibError as error:
        assert error.error == "invalid_scope", f"{type(error).__name__}: {error.error!r}"
    else:
        raise AssertionError("a scope the client may not ask for was granted")
    raw = state["raw"]
    assert raw.status_code == 400, show(raw)
    assert raw.headers.get("Cache-Control") == "no-store", show(raw)


def main():
    check(
        "requests-oauthlib",
        [
            ("fetch_token (BackendApplicationClient, HTTP Basic)", ro_fetch),
            ("token: bearer, expires_in 3600, scope read, no refresh token", ro_token),
            ("token answer: Cache-Control no-store, Pragma no-cache, JSON", ro_headers),
            ("GET /v1/health through the session -> 200", ro_api),
        ],
    )
    check("requests-oauthlib", [("wrong secret -> InvalidClientError; raw 401, WWW-Authenticate Basic", ro_wrong_secret)])
    check("requests-oauthlib", [("unknown scope -> InvalidScopeError (400)", ro_unknown_scope)])
    check(
        "Authlib",
        [
            ("fetch_token (client_credentials, client_secret_basic); answer no-store, JSON", al_fetch),
            ("token: bearer, expires_in 3600, scope read, no refresh token", al_token),
            ("GET /v1/health through the session -> 200", al_api),
            ("introspect_token -> active, scope read, client_id", al_introspect),
            ("revoke_token -> 200", al_revoke),
            ("introspect_token after revoking -> {\"active\": false}", al_introspect_revoked),
            ("GET /v1/health with the revoked token -> 401 invalid_api_key", al_api_refused),
        ],
    )
    check("Authlib", [("wrong secret -> OAuthError invalid_client; raw 401, WWW-Authenticate Basic", al_wrong_secret)])
    check("Authlib", [("unknown scope -> OAuthError invalid_scope (400)", al_unknown_scope)])

    print(f"oauth-clients: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
