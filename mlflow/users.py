"""MLflow users for the basic-auth app: `bootstrap` (the entrypoint runs it once the server is up)
creates the user tuneloop's services log in as, or sets its password to the configured one (so a
new MLFLOW_TRACKING_PASSWORD in .env takes effect on the next start); `check` (the healthcheck)
succeeds once that user can log in.

Environment: MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (the admin) and
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the client). Standard library only; no
secret is printed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SERVER = os.environ.get("MLFLOW_USERS_SERVER", "http://127.0.0.1:5000")


def _request(method: str, path: str, user: str, password: str,
             body: dict | None = None, timeout_s: float = 10.0) -> int:
    """The HTTP status of an authenticated request (errors included)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(SERVER + path, data=data, method=method, headers={
        "Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not answering (yet)
        return 0


def _wait_for_server(deadline_s: float = 300.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        try:
            with urllib.request.urlopen(SERVER + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"mlflow-users: the server did not answer {SERVER}/health in "
                     f"{deadline_s:.0f} s")


def bootstrap() -> int:
    admin = os.environ["MLFLOW_AUTH_ADMIN_USERNAME"]
    admin_password = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    client = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not client or not password:
        print("mlflow-users: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD unset; no "
              "client user made", file=sys.stderr)
        return 0
    if client == admin:
        print("mlflow-users: MLFLOW_TRACKING_USERNAME is the admin; give tuneloop a user of its "
              "own (tuneloop secrets init writes one)", file=sys.stderr)
        return 2
    _wait_for_server()
    # Retried: a worker still starting (or a slow first password hash) times a request out, and
    # a create that timed out may have happened, which the next round sees as "exists".
    for attempt in range(10):
        query = urllib.parse.urlencode({"username": client})
        exists = _request("GET", f"/api/2.0/mlflow/users/get?{query}", admin, admin_password,
                          timeout_s=60)
        if exists == 200:
            status = _request("PATCH", "/api/2.0/mlflow/users/update-password", admin,
                              admin_password, {"username": client, "password": password},
                              timeout_s=60)
            action = "password set"
        elif exists == 404:
            status = _request("POST", "/api/2.0/mlflow/users/create", admin, admin_password,
                              {"username": client, "password": password}, timeout_s=60)
            action = "created"
        else:
            status, action = exists, "looked up"
        if status == 200:
            print(f"mlflow-users: user {client!r} {action}", file=sys.stderr)
            return 0
        if status in (401, 403):
            break
        time.sleep(min(2 ** attempt, 30))
    print(f"mlflow-users: user {client!r} not {action} (HTTP {status or 'timeout'}); is "
          "MLFLOW_AUTH_ADMIN_PASSWORD the admin's current password?", file=sys.stderr)
    return 1


def check() -> int:
    client = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    status = _request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", client,
                      password)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    commands = {"bootstrap": bootstrap, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: mlflow-users {'|'.join(commands)}")
    sys.exit(commands[sys.argv[1]]())
