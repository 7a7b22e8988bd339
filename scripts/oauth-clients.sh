#!/usr/bin/env bash
# The quickstart's OAuth2 endpoints (/oauth/token, /oauth/revoke, /oauth/introspect) and a
# token on the demo API, through two Python client libraries no one here wrote:
# requests-oauthlib and Authlib, used as their docs show (scripts/oauth_clients.py).
#
#   bash scripts/oauth-clients.sh
#
# Settings, from the environment:
#   CARGO_TARGET_DIR   where the quickstart is built and the venv is cached
#
# Prints one line per check and `oauth-clients: N passed, N failed`; exits non-zero when a
# check fails (or the libraries or the quickstart cannot run).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
venv=$target/oauth-clients-venv
# Pinned: the two libraries, and what their behaviour rests on (oauthlib under
# requests-oauthlib, requests under both).
requirements="requests-oauthlib==2.0.0 Authlib==1.9.10 oauthlib==4.0.1 requests==2.34.2"

if [ "$(cat "$venv/requirements" 2>/dev/null)" != "$requirements" ]; then
  echo "installing $requirements in $venv"
  rm -rf "$venv"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
  fi
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one word per requirement
  "$venv/bin/pip" install -q --disable-pip-version-check $requirements
  echo "$requirements" >"$venv/requirements"
fi
"$venv/bin/python" -c 'import authlib, oauthlib, requests_oauthlib; print(f"Authlib {authlib.__version__}, requests-oauthlib {requests_oauthlib.__version__}, oauthlib {oauthlib.__version__}")'

# shellcheck source=scripts/quickstart.sh
. scripts/quickstart.sh
start_quickstart
CLIENT_ID=$(value CLIENT_ID)
CLIENT_SECRET=$(value CLIENT_SECRET)
for name in CLIENT_ID CLIENT_SECRET; do
  [ -n "${!name}" ] || { echo "the quickstart printed no $name=" >&2; exit 1; }
done
echo "quickstart at $url (OAuth2 client $CLIENT_ID, scope read)"

status=0
URL=$url CLIENT_ID=$CLIENT_ID CLIENT_SECRET=$CLIENT_SECRET \
  "$venv/bin/python" scripts/oauth_clients.py || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- quickstart stderr (last 40 lines)" >&2
  tail -40 "$work/err" >&2
fi
exit "$status"
