"""`tuneloop secrets init | client | revoke | check`: the secrets a production stack runs with.

`init` writes a `.env` (mode 0600, next to docker-compose.yaml) with TUNELOOP_ENV=production and a
fresh value for every secret the compose file requires; it never overwrites one without
`--force`. Router clients are stored as key digests (`sha256:<hex>`, tasks.core.secrets
.key_digest), so a key is shown once, on stderr, and kept nowhere: `client NAME` makes another,
`revoke NAME` drops one; rotating a key is adding a new client, deploying it, moving the caller
over, then revoking the old one. `check` runs the production checks of tasks.core.settings on
the current environment (and `.env`), and the router's client rules (serving.router_config),
and exits 2 listing every problem, one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from tasks.cli.common import EXIT_OK, UsageError, add_command
from tasks.core.secrets import CLIENT_NAME, CLIENT_NAME_RULE

DOCKER_SOCKET = Path("/var/run/docker.sock")
CLIENTS_VARIABLE = "TUNELOOP_ROUTER_CLIENTS"
MLFLOW_ADMIN_USERNAME = "mlflow-admin"
MLFLOW_CLIENT_USERNAME = "tuneloop"
AIRFLOW_DEFAULT_UID = 50000  # the official Airflow image's user
# A value .env can hold bare; anything else is single-quoted (docker compose and python-dotenv
# both read single quotes literally).
_BARE = re.compile(r"[A-Za-z0-9_./:,+@=-]*")

# .env sections, in file order: (comment, variables).
SECTIONS = (
    ("tuneloop refuses development-default secrets in this mode", ("TUNELOOP_ENV",)),
    ("PostgreSQL (tuneloop, Airflow and MLflow databases); Redis (the Celery broker)",
     ("POSTGRES_USER", "POSTGRES_PASSWORD", "REDIS_PASSWORD")),
    ("tuneloop services", ("TUNELOOP_USER_HASH_SALT", "TUNELOOP_ROUTER_ADMIN_KEY",
                           CLIENTS_VARIABLE, "TUNELOOP_MODEL_SERVER_API_KEY",
                           "TUNELOOP_LLM_API_KEY", "TUNELOOP_MODEL_SERVER_ADMIN_KEY",
                           "TUNELOOP_REGISTRY_SIGNING_KEY")),
    ("Airflow (API server tokens, Connection encryption, the UI login)",
     ("AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "AIRFLOW_ADMIN_USER", "AIRFLOW_ADMIN_PASSWORD")),
    ("MLflow basic-auth app: the admin login, and the user tuneloop's services log in as",
     ("MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
      "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")),
    ("host: the Airflow user, the data folder, the Docker socket's group (docker backend)",
     ("AIRFLOW_UID", "TUNELOOP_HOST_DATA_DIR", "DOCKER_GID")),
)

HEADER = """\
# Written by `tuneloop secrets init`: every secret of the docker compose stack. Keep it private
# (mode 0600, never committed). Router client keys are not here, only their digests: the key was
# printed once. Rotation: README "Security"; `tuneloop secrets check` validates this file.
"""


def new_secret() -> str:
    """A 256-bit random secret, hex (keys, salts, signing keys)."""
    return secrets.token_hex(32)


def new_password() -> str:
    """A 192-bit random password, url-safe (logins: Airflow UI, MLflow, PostgreSQL)."""
    return secrets.token_urlsafe(24)


def new_client_key() -> str:
    """A router client key; the `tl_` prefix lets secret scanners recognise a leaked one."""
    return "tl_" + secrets.token_urlsafe(32)


def new_fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def production_env(*, airflow_uid: int, host_data_dir: str, docker_gid: int | None,
                   client: str = "default") -> tuple[dict[str, str], str]:
    """Fresh values for every variable docker-compose.yaml requires, and the first router
    client's key (which the values hold only as a digest)."""
    from tasks.core.secrets import key_digest

    client_key = new_client_key()
    model_server_key = new_secret()
    values = {
        "TUNELOOP_ENV": "production",
        "POSTGRES_USER": "tuneloop",
        "POSTGRES_PASSWORD": new_password(),
        "REDIS_PASSWORD": new_secret(),  # hex: it sits in the broker URL as it is
        "TUNELOOP_USER_HASH_SALT": new_secret(),
        "TUNELOOP_ROUTER_ADMIN_KEY": new_secret(),
        CLIENTS_VARIABLE: clients_json({client: key_digest(client_key)}),
        "TUNELOOP_MODEL_SERVER_API_KEY": model_server_key,
        # Tasks call the local model server (or vLLM, which takes the same key).
        "TUNELOOP_LLM_API_KEY": model_server_key,
        "TUNELOOP_MODEL_SERVER_ADMIN_KEY": new_secret(),
        "TUNELOOP_REGISTRY_SIGNING_KEY": new_secret(),
        "AIRFLOW_JWT_SECRET": new_secret(),
        "AIRFLOW_FERNET_KEY": new_fernet_key(),
        "AIRFLOW_ADMIN_USER": "admin",
        "AIRFLOW_ADMIN_PASSWORD": new_password(),
        "MLFLOW_ADMIN_USERNAME": MLFLOW_ADMIN_USERNAME,
        "MLFLOW_ADMIN_PASSWORD": new_password(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": new_secret(),
        "MLFLOW_TRACKING_USERNAME": MLFLOW_CLIENT_USERNAME,
        "MLFLOW_TRACKING_PASSWORD": new_password(),
        "AIRFLOW_UID": str(airflow_uid),
        "TUNELOOP_HOST_DATA_DIR": host_data_dir,
    }
    if docker_gid is not None:
        values["DOCKER_GID"] = str(docker_gid)
    return values, client_key


def clients_json(clients: dict[str, str]) -> str:
    return json.dumps(clients, separators=(",", ":"), sort_keys=True)


def env_line(name: str, value: str) -> str:
    if _BARE.fullmatch(value):
        return f"{name}={value}"
    if "'" in value or "\n" in value:
        raise UsageError(f"{name}={value!r} cannot be written to .env (a quote or a newline); "
                         "choose another value")
    return f"{name}='{value}'"


def render_env(values: dict[str, str]) -> str:
    """The .env text: a header, then the variables by section; unknown names last."""
    lines = [HEADER.rstrip("\n")]
    placed: set[str] = set()
    for comment, names in SECTIONS:
        present = [name for name in names if name in values]
        if not present:
            continue
        lines += ["", f"# {comment}"]
        lines += [env_line(name, values[name]) for name in present]
        placed.update(present)
    rest = [name for name in values if name not in placed]
    if rest:
        lines += [""] + [env_line(name, values[name]) for name in rest]
    if "DOCKER_GID" not in values:
        lines.append("# DOCKER_GID=<group id of the Docker socket: stat -c %g /var/run/docker.sock>")
    return "\n".join(lines) + "\n"


def _exists_error(path: Path) -> UsageError:
    return UsageError(f"{path} exists; it holds the stack's current secrets: keep it, or pass "
                      "--force to replace every secret (PostgreSQL, Airflow and MLflow keep "
                      "their old passwords until changed there: README \"Security\")")


def write_private(path: Path, text: str, *, overwrite: bool) -> None:
    """Write `text` to `path` readable by its owner only (0600), also when it replaces a file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise _exists_error(path) from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)  # a replaced file keeps its old mode otherwise
        handle.write(text)


def _docker_gid() -> int | None:
    try:
        return DOCKER_SOCKET.stat().st_gid
    except OSError:
        return None


def _init(args: argparse.Namespace) -> int:
    path = Path(args.env_file)
    if not args.print and path.exists() and not args.force:
        raise _exists_error(path)
    host_data_dir = args.host_data_dir or str(path.resolve().parent / "data")
    # The containers run as this user; root's uid would make them run as root.
    uid = args.airflow_uid if args.airflow_uid is not None else os.getuid()
    if uid == 0:
        print(f"note: AIRFLOW_UID={AIRFLOW_DEFAULT_UID}, not 0: the containers must not run as "
              "root", file=sys.stderr)
        uid = AIRFLOW_DEFAULT_UID
    gid = args.docker_gid if args.docker_gid is not None else _docker_gid()
    values, client_key = production_env(airflow_uid=uid, host_data_dir=host_data_dir,
                                        docker_gid=gid)
    text = render_env(values)
    if args.print:
        sys.stdout.write(text)
    else:
        write_private(path, text, overwrite=args.force)
    print(f"router client 'default' key (shown once, kept nowhere; give it to the caller "
          f"now): {client_key}", file=sys.stderr)
    if "DOCKER_GID" not in values:
        print(f"warning: {DOCKER_SOCKET} not found; set DOCKER_GID in .env to the group of the "
              "Docker socket (docker compose requires it)", file=sys.stderr)
    if not args.print:
        print(json.dumps({"env_file": str(path), "mode": "0600", "variables": sorted(values),
                          "router_clients": ["default"]}))
    return EXIT_OK


def _current_clients(env_file: str | None) -> dict[str, str]:
    if env_file:
        from dotenv import dotenv_values

        path = Path(env_file)
        if not path.is_file():
            raise UsageError(f"--env-file {env_file}: no such file; `tuneloop secrets init` "
                             "writes one")
        raw = dotenv_values(path).get(CLIENTS_VARIABLE) or "{}"
        try:
            clients = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{CLIENTS_VARIABLE} in {env_file} is not JSON ({exc}); e.g. "
                             f"{CLIENTS_VARIABLE}='{{\"web\":\"sha256:<hex>\"}}'") from None
        if not isinstance(clients, dict):
            raise UsageError(f"{CLIENTS_VARIABLE} in {env_file} must be a JSON object of "
                             "client name -> key digest")
        return {str(k): str(v) for k, v in clients.items()}
    from tasks.core.settings import read_router_clients

    return read_router_clients()


def update_env_file(path: Path, name: str, value: str) -> None:
    """Set `name=value` in the .env at `path` (replacing its line, or appending), keeping 0600."""
    lines = path.read_text().splitlines()
    new = env_line(name, value)
    replaced = False
    for index, line in enumerate(lines):
        if line.split("=", 1)[0].strip().removeprefix("export ").strip() == name:
            lines[index], replaced = new, True
    if not replaced:
        lines.append(new)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_private(tmp, "\n".join(lines) + "\n", overwrite=False)
    os.replace(tmp, path)


def _publish_clients(args: argparse.Namespace, clients: dict[str, str],
                     summary: dict[str, Any]) -> None:
    encoded = clients_json(clients)
    if args.env_file:
        update_env_file(Path(args.env_file), CLIENTS_VARIABLE, encoded)
        print(f"updated {CLIENTS_VARIABLE} in {args.env_file}; redeploy the router "
              "(docker compose up -d router) for it to apply", file=sys.stderr)
    else:
        print(f"set {env_line(CLIENTS_VARIABLE, encoded)} (in .env) and redeploy the router",
              file=sys.stderr)
    print(json.dumps({**summary, "clients": sorted(clients), CLIENTS_VARIABLE: encoded}))


def _client(args: argparse.Namespace) -> int:
    from tasks.core.secrets import key_digest

    if not CLIENT_NAME.fullmatch(args.name):
        raise UsageError(f"client name {args.name!r} must be {CLIENT_NAME_RULE}; e.g. web-2026")
    clients = _current_clients(args.env_file)
    if args.name in clients and not args.replace:
        raise UsageError(f"client {args.name!r} exists; rotate by adding a new name (e.g. "
                         f"{args.name}-2), deploying, then `tuneloop secrets revoke {args.name}`"
                         " — or pass --replace to cut it over at once")
    key = new_client_key()
    clients[args.name] = key_digest(key)
    print(f"router client {args.name!r} key (shown once, kept nowhere; give it to the caller "
          f"now): {key}", file=sys.stderr)
    _publish_clients(args, clients, {"client": args.name})
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    clients = _current_clients(args.env_file)
    if args.name not in clients:
        known = ", ".join(sorted(clients)) or "none"
        raise UsageError(f"no router client {args.name!r}; the clients are: {known}")
    del clients[args.name]
    if not clients:
        print("warning: no router client left; in production the router then refuses to "
              "start (`tuneloop secrets client NAME` adds one)", file=sys.stderr)
    _publish_clients(args, clients, {"revoked": args.name})
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from tasks.core.settings import SettingsError, load_settings

    problems: list[str] = []
    path = Path(args.env_file)
    if path.is_file() and path.stat().st_mode & 0o077:
        problems.append(f"{path}: readable by other users (mode "
                        f"{path.stat().st_mode & 0o777:04o}); chmod 600 {path}")
    try:
        settings = load_settings(env="production", _env_file=path if path.is_file() else None)
    except SettingsError as exc:
        problems += [line.strip() for line in str(exc).splitlines()[1:]]
        settings = None
    clients: list[str] = []
    if settings is not None:
        from pydantic import ValidationError

        from serving.router_config import RouterConfig

        try:  # the router's own rules: TUNELOOP_ROUTER_API_KEY folded in, one key per client
            clients = sorted(RouterConfig.from_settings(settings).clients)
        except ValidationError as exc:
            problems += [str(error["msg"]).removeprefix("Value error, ")
                         for error in exc.errors()]
    if problems:
        raise SettingsError("not ready for production:\n  " + "\n  ".join(problems))
    uri = settings.resolved_mlflow_tracking_uri
    print(json.dumps({"production_ready": True,
                      "airflow_checked": settings.is_airflow_process,
                      "mlflow_auth_checked": uri.startswith(("http://", "https://")),
                      "router_clients": clients}))
    return EXIT_OK


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """`tuneloop secrets` and its four actions."""
    secrets_parser = add_command(
        sub, "secrets", lambda _: 0, parents=parents,
        summary="make and check production secrets: the .env, router client keys",
        examples=["tuneloop secrets init && docker compose up airflow-init",
                  "tuneloop secrets client web-2026 --env-file .env",
                  "tuneloop secrets revoke web --env-file .env",
                  "tuneloop secrets check"])
    actions = secrets_parser.add_subparsers(dest="secrets_command", required=True,
                                            metavar="<action>")

    init = add_command(actions, "init", _init, parents=parents,
                       summary="write a .env (mode 0600) with TUNELOOP_ENV=production and fresh "
                               "secrets for docker compose; print the first router client key",
                       examples=["tuneloop secrets init",
                                 "tuneloop secrets init --print > /run/secrets/tuneloop.env"])
    init.add_argument("--env-file", default=".env", help="the file to write")
    init.add_argument("--force", action="store_true",
                      help="replace an existing file (every secret changes)")
    init.add_argument("--print", action="store_true",
                      help="print the file on stdout instead of writing it")
    init.add_argument("--host-data-dir",
                      help="host folder of the stack's data (default: data/ beside the file)")
    init.add_argument("--airflow-uid", type=int,
                      help="uid the containers run as (default: yours; 50000 for root)")
    init.add_argument("--docker-gid", type=int,
                      help="group of the Docker socket (default: read from "
                           "/var/run/docker.sock)")

    for name, fn, summary, examples in (
            ("client", _client, "add a router client: print its key once and the new "
                                f"{CLIENTS_VARIABLE}",
             ["tuneloop secrets client web-2026 --env-file .env",
              "tuneloop secrets client batch-jobs"]),
            ("revoke", _revoke, f"remove a router client from {CLIENTS_VARIABLE}",
             ["tuneloop secrets revoke web --env-file .env"])):
        action = add_command(actions, name, fn, parents=parents, summary=summary,
                             examples=examples)
        action.add_argument("name", help="the client's name, e.g. web-2026")
        action.add_argument("--env-file",
                            help="update this .env in place (default: print the new value; "
                                 "the current one comes from the environment / .env)")
        if name == "client":
            action.add_argument("--replace", action="store_true",
                                help="give an existing client a new key now (its old key stops "
                                     "working on the next deploy)")

    check = add_command(actions, "check", _check, parents=parents,
                        summary="run the production checks on this environment (and .env): "
                                "exit 0 when ready, 2 listing every problem",
                        examples=["tuneloop secrets check",
                                  "docker compose run --rm airflow-scheduler tuneloop secrets "
                                  "check"])
    check.add_argument("--env-file", default=".env",
                       help="the .env read besides the environment (and checked for mode 0600)")
