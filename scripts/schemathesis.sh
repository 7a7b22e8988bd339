#!/usr/bin/env bash
# schemathesis against the quickstart (the demo API and the key service on one server): the
# OpenAPI document it serves at /swagger/openapi.json, checked by generated requests.
#
#   bash scripts/schemathesis.sh [SCHEMATHESIS RUN OPTIONS…]   # e.g. --include-path-regex '^/v1/keys'
#
# Settings, from the environment:
#   SCHEMATHESIS_MAX_EXAMPLES  test cases per operation and phase (default 100)
#   SCHEMATHESIS_SEED          a seed, to replay a run (default: random, printed)
#   SCHEMATHESIS_VERSION       the schemathesis release (default 4.32.5)
#   SCHEMATHESIS_REPORT        the report's format (default junit; har keeps every request and answer)
#   CARGO_TARGET_DIR           where the quickstart is built and the venv is cached
#
# Exits non-zero when schemathesis finds a failure (or cannot run).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
version=${SCHEMATHESIS_VERSION:-4.32.5}
examples=${SCHEMATHESIS_MAX_EXAMPLES:-100}
seed=${SCHEMATHESIS_SEED:-$RANDOM$RANDOM}
venv=$target/schemathesis-venv

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$version"; then
  echo "installing schemathesis $version in $venv"
  rm -rf "$venv"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
fi
"$venv/bin/schemathesis" --version

# shellcheck source=scripts/quickstart.sh
. scripts/quickstart.sh
start_quickstart
KEY_FULL=$(value KEY_FULL)
OWNER=$(value OWNER)
OWNER_PASSWORD=$(value OWNER_PASSWORD)
CLIENT_ID=$(value CLIENT_ID)
CLIENT_SECRET=$(value CLIENT_SECRET)
for name in KEY_FULL OWNER OWNER_PASSWORD CLIENT_ID CLIENT_SECRET; do
  [ -n "${!name}" ] || { echo "the quickstart printed no $name=" >&2; exit 1; }
done
echo "quickstart at $url (owner $OWNER)"

# A session for the management API (/v1/keys…, /v1/audit): 15 minutes, more than a run takes.
KEYGATE_SESSION=$(URL=$url OWNER=$OWNER OWNER_PASSWORD=$OWNER_PASSWORD "$venv/bin/python" - <<'EOF'
import json, os, urllib.request
body = json.dumps({"username": os.environ["OWNER"], "password": os.environ["OWNER_PASSWORD"]}).encode()
request = urllib.request.Request(os.environ["URL"] + "/auth/session", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as answer:
    print(json.load(answer)["token"])
EOF
)
export KEYGATE_SESSION KEY_FULL CLIENT_ID CLIENT_SECRET

# Credentials per security scheme of the document: the session for `Session`, the demo key
# for `ApiKey` (X-API-KEY; the first scheme /auth/testkey and the demo API accept), the demo
# OAuth2 client for `ClientBasic` (/oauth/…). Values are read from the environment, so no
# secret is written down.
cat >"$work/schemathesis.toml" <<'EOF'
[auth.openapi.Session]
bearer = "${KEYGATE_SESSION}"

[auth.openapi.ApiKey]
api_key = "${KEY_FULL}"

[auth.openapi.ClientBasic]
username = "${CLIENT_ID}"
password = "${CLIENT_SECRET}"
EOF

# Every check but positive_data_acceptance: data valid by the schema is still refused where
# the schema cannot say why (an id that names no key: 404; a name of 256 characters but more
# than 256 bytes: 422), and those refusals are documented.
echo "schemathesis: seed $seed, $examples examples per operation"
status=0
# From the scratch directory, so that schemathesis's cache (.schemathesis/) lands there.
report=$(realpath -m "$target/schemathesis-report")
schemathesis=$(realpath "$venv/bin/schemathesis")
(cd "$work" && "$schemathesis" --config-file "$work/schemathesis.toml" --no-color run \
  "$url/swagger/openapi.json" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --max-examples "$examples" \
  --seed "$seed" \
  --workers 1 \
  --request-timeout 10 \
  --report "${SCHEMATHESIS_REPORT:-junit}" --report-dir "$report" \
  "$@") || status=$?
if [ "$status" -ne 0 ]; then
  echo "schemathesis failed (exit $status); replay with SCHEMATHESIS_SEED=$seed" >&2
  echo "--- quickstart stderr (last 40 lines)" >&2
  tail -40 "$work/err" >&2
fi
exit "$status"
