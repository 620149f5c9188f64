"""Real Airflow 3 for end-to-end tests, plus a PostgreSQL cluster a test may stop and start.

`AirflowStack` runs `airflow api-server`, `scheduler`, `dag-processor` and `triggerer` as
subprocesses (what `airflow standalone` runs, each in its own process group so teardown reaches
every child) with AIRFLOW_HOME in a temp dir, LocalExecutor, a throwaway metadata database, the
repo's dags/ and plugins/, and the simple auth manager. Tests drive it only through the public
REST API v2 (a JWT from `POST /auth/token`), read task logs from the log folder when something
fails, and take UI screenshots with headless Chromium over the DevTools protocol (the JWT goes
in as the UI's `_token` cookie, so the page is the logged-in grid, not the login form).

`PrivatePostgres` is an initdb'd cluster on a free port (trust auth) owned by one test, so a fault
drill can restart it without touching the machine's shared server on 5432.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")
CHROMIUM = "/usr/bin/chromium"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "tuneloop"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
# Task-instance states whose logs a failure report shows.
TI_BAD = ("failed", "upstream_failed", "up_for_retry")
# Chromium flags known to render the Airflow UI headless on this machine (see NOTES.md).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


class HarnessError(AssertionError):
    """Something in the real stack did not do what the test waits for; the message says what."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def render_task_log(path: Path) -> list[str]:
    """Airflow 3 task logs are JSON lines: render `time level event`, and each exception as
    `Type: value (at the innermost project frame)`."""
    lines: list[str] = []
    try:
        raw = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [f"<cannot read {path}: {exc}>"]
    for line in raw:
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        stamp = str(record.get("timestamp", ""))[11:23]
        lines.append(f"{stamp} {record.get('level', ''):7} {record.get('event', '')}")
        for error in record.get("error_detail") or []:
            frames = [f for f in error.get("frames", []) if str(ROOT) in f.get("filename", "")
                      and ".venv" not in f.get("filename", "")]
            where = (f" (at {Path(frames[-1]['filename']).relative_to(ROOT)}:"
                     f"{frames[-1]['lineno']} {frames[-1]['name']})" if frames else "")
            lines.append(f"    {error.get('exc_type')}: {error.get('exc_value')}{where}")
    return lines


def airflow_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment for an Airflow subprocess: `base` (default os.environ) without pytest's
    own variables, plus `overrides`."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if not k.startswith("PYTEST_")}
    env.update(overrides)
    return env


def migrate_metadata(env: Mapping[str, str]) -> None:
    """`airflow db migrate` against env's AIRFLOW__DATABASE__SQL_ALCHEMY_CONN."""
    result = subprocess.run([AIRFLOW_BIN, "db", "migrate"], capture_output=True, text=True,
                            env=dict(env), timeout=300)
    if result.returncode != 0:
        raise HarnessError("airflow db migrate failed:\n" + result.stderr[-3000:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _terminate_groups(procs: Sequence[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM the process groups this harness started (each component and its children) all at
    once, wait up to `timeout` for them together, then SIGKILL whatever is left."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:  # children (executor workers, task processes) may outlive the leader
        _signal_group(proc, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=10)


class AirflowStack:
    """Airflow components on a free port; use as a context manager (teardown always runs).

    `env` adds to the components' environment (tuneloop's DATABASE_URL, LLM endpoint, ...).
    Running stacks are listed in `AirflowStack.running` (tests/e2e/conftest.py attaches their
    logs to a failed test's report).
    """

    running: ClassVar[list[AirflowStack]] = []

    def __init__(self, home: Path, metadata_url: str, env: Mapping[str, str] | None = None, *,
                 components: Sequence[str] = COMPONENTS, parallelism: int = 4,
                 restart_always: bool = False) -> None:
        self.home = Path(home)
        # docker compose's `restart: always`: a component that exits (the dag-processor does
        # when the metadata database goes away) is started again; `restarts` records it.
        self.restart_always = restart_always
        self.restarts: list[tuple[str, int]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.components = tuple(components)
        self.processes: dict[str, subprocess.Popen] = {}
        self.token = ""
        self._client: Any = None
        self.env = airflow_env(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=metadata_url,
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM=str(parallelism),
            AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
            AIRFLOW__CORE__AUTH_MANAGER=SIMPLE_AUTH_MANAGER,
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{ADMIN_USER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.base_url}/execution/",
            AIRFLOW__CORE__FERNET_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.port),
            AIRFLOW__API__BASE_URL=self.base_url,
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=secrets.token_hex(16),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
            # A fresh stack parses dags/ once at start; nothing changes the folder afterwards.
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="600",
            AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False",
            # Log servers on free ports too: never clash with another stack on this machine.
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
            **dict(env or {}),
        )

    # ---- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> AirflowStack:
        AirflowStack.running.append(self)
        try:
            self.start()
        except BaseException:
            print(self.diagnostics(), file=sys.stderr)
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 240) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        migrate_metadata(self.env)
        for name in self.components:
            self._spawn(name, "w")
        self._wait_healthy(timeout)
        self.token = self._login()
        import httpx

        self._client = httpx.Client(base_url=self.base_url, timeout=30,
                                    headers={"Authorization": f"Bearer {self.token}"})

    def stop(self) -> None:
        if self in AirflowStack.running:
            AirflowStack.running.remove(self)
        if self._client is not None:
            self._client.close()
            self._client = None
        # Scheduler first: no new task processes while the rest shuts down.
        order = sorted(self.processes, key=lambda name: name != "scheduler")
        _terminate_groups([self.processes[name] for name in order])
        self.processes.clear()

    def _spawn(self, name: str, mode: str) -> None:
        log = open(self.home / f"{name}.log", mode)  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [AIRFLOW_BIN, name], cwd=self.home, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child holds its own descriptor

    def _check_alive(self) -> None:
        for name, proc in list(self.processes.items()):
            if proc.poll() is None:
                continue
            if not self.restart_always:
                raise HarnessError(f"airflow {name} exited with {proc.returncode}:\n"
                                   + tail(self.home / f"{name}.log", 80))
            self.restarts.append((name, proc.returncode))
            self._spawn(name, "a")

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        wanted = {"api-server": "metadatabase", "scheduler": "scheduler",
                  "dag-processor": "dag_processor", "triggerer": "triggerer"}
        keys = [wanted[c] for c in self.components]
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
                if all((last.get(k) or {}).get("status") == "healthy" for k in keys):
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(1)
        raise HarnessError(f"airflow not healthy after {timeout:.0f} s: {last}")

    def _login(self) -> str:
        import httpx

        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())[ADMIN_USER]
        response = httpx.post(f"{self.base_url}/auth/token", timeout=30,
                              json={"username": ADMIN_USER, "password": password})
        if response.status_code != 201:
            raise HarnessError(f"POST /auth/token: {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    # ---- REST API v2 -------------------------------------------------------------------
    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._client.request(method, "/api/v2" + path, **kwargs)
        if response.status_code >= 400:
            raise HarnessError(f"{method} /api/v2{path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    def ensure_pool(self, name: str, slots: int, description: str = "") -> None:
        response = self._client.post("/api/v2/pools", json={
            "name": name, "slots": slots, "description": description})
        if response.status_code == 409:
            self.api("PATCH", f"/pools/{name}", json={"slots": slots})
        elif response.status_code >= 400:
            raise HarnessError(f"POST /api/v2/pools: {response.status_code} {response.text}")

    def create_tuneloop_pools(self) -> None:
        """The pools tuneloop's tasks run in (what airflow-init creates in compose)."""
        if str(ROOT / "plugins") not in sys.path:
            sys.path.insert(0, str(ROOT / "plugins"))
        from tuneloop_airflow.common import POOLS

        for name, (slots, description) in POOLS.items():
            self.ensure_pool(name, slots, description)

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 120) -> None:
        """Until the dag-processor has serialized every one of `dag_ids` (fail on import errors)."""
        wanted = set(dag_ids)
        deadline = time.monotonic() + timeout
        found: set[str] = set()
        while time.monotonic() < deadline:
            self._check_alive()
            errors = self.api("GET", "/importErrors")["import_errors"]
            if errors:
                raise HarnessError("DAG import errors:\n" + "\n".join(
                    f"{e['filename']}: {e['stack_trace']}" for e in errors))
            found = {d["dag_id"] for d in self.api("GET", "/dags", params={"limit": 100})["dags"]}
            if wanted <= found:
                return
            time.sleep(1)
        raise HarnessError(f"DAGs {sorted(wanted - found)} not parsed after {timeout:.0f} s")

    def unpause(self, dag_id: str) -> None:
        dag = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        assert dag["is_paused"] is False, dag

    def trigger(self, dag_id: str, conf: Mapping[str, Any]) -> dict[str, Any]:
        return self.api("POST", f"/dags/{dag_id}/dagRuns",
                        json={"logical_date": None, "conf": dict(conf)})

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                        params={"limit": 100})["task_instances"]

    def wait_for_run(self, dag_id: str, *, run_id: str | None = None,
                     run_type: str | None = None, timeout: float = 300) -> dict[str, Any]:
        """Poll until the run (the given id, else the first of `run_type`, else any) succeeds.

        Fails fast when it fails, with every task's state and the log tail of the bad ones.
        """
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                runs = self.dag_runs(dag_id)
            except Exception as exc:  # noqa: BLE001 - the API's own database may be restarting
                if not self.restart_always:
                    raise
                print(f"airflow API not answering yet ({str(exc)[:120]}); retrying",
                      file=sys.stderr)
                time.sleep(2)
                continue
            seen = [r for r in runs
                    if (run_id is None or r["dag_run_id"] == run_id)
                    and (run_type is None or r["run_type"] == run_type)]
            for run in seen:
                if run["state"] == "failed":
                    raise HarnessError(f"{dag_id} run {run['dag_run_id']} failed:\n"
                                       + self.describe_run(dag_id, run["dag_run_id"]))
                if run["state"] == "success":
                    return run
            time.sleep(2)
        described = "\n".join(self.describe_run(dag_id, r["dag_run_id"]) for r in seen)
        raise HarnessError(f"no successful {run_type or ''} run of {dag_id} after "
                           f"{timeout:.0f} s (runs: {[(r['dag_run_id'], r['state']) for r in seen]})"
                           f"\n{described}\n{self.diagnostics(lines=30)}")

    def describe_run(self, dag_id: str, run_id: str, log_lines: int = 40) -> str:
        """Every task's state; for the bad ones, the error of each attempt and the readable tail
        of the last attempt's log."""
        lines = []
        for ti in sorted(self.task_instances(dag_id, run_id),
                         key=lambda t: (t["task_id"], t["map_index"])):
            mapped = f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""
            lines.append(f"  {ti['task_id']}{mapped}: {ti['state']} (try {ti['try_number']})")
            if ti["state"] not in TI_BAD:
                continue
            logs = self.task_log_files(dag_id, run_id, ti["task_id"], ti["map_index"])
            for log in logs[:-1]:  # earlier attempts: just the exception they failed with
                errors = [line.strip().splitlines()[0] for line in render_task_log(log)
                          if line.startswith("    ")]
                lines.append(f"    {log.name}: {errors[0] if errors else 'no exception logged'}")
            if logs:
                lines.append(f"    --- {logs[-1].relative_to(self.home)} (tail)")
                lines.extend("    " + line for line in render_task_log(logs[-1])[-log_lines:])
        return "\n".join(lines)

    def task_log_files(self, dag_id: str, run_id: str, task_id: str | None = None,
                       map_index: int = -1) -> list[Path]:
        """Attempt logs of a run (default log folder layout), oldest attempt first."""
        run_dir = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        pattern = f"task_id={task_id}" if task_id else "task_id=*"
        pattern += f"/map_index={map_index}/attempt=*.log" if map_index >= 0 else "/**/attempt=*.log"
        return sorted(run_dir.glob(pattern))

    def diagnostics(self, lines: int = 60) -> str:
        """The tail of every component's log, for a failure report."""
        parts = []
        for name in self.components:
            parts.append(f"===== airflow {name} (last {lines} lines)")
            parts.append(tail(self.home / f"{name}.log", lines))
        return "\n".join(parts)

    # ---- UI ----------------------------------------------------------------------------
    def screenshot(self, path: str, png: Path, *, wait_for_text: Sequence[str],
                   timeout: float = 90, window: tuple[int, int] = (1600, 1000)) -> Path:
        """Open `path` of the UI logged in (JWT cookie) in headless Chromium, wait until every
        string of `wait_for_text` is on the page, and save a PNG of the viewport."""
        return chromium_screenshot(self.base_url + path, png, wait_for_text=wait_for_text,
                                   cookies=[{"name": "_token", "value": self.token,
                                             "url": self.base_url + "/"}],
                                   timeout=timeout, window=window)


def tuneloop_env(*, database_url: str, llm_base_url: str, data_dir: Path,
                 param_defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 retry_delay_s: float = 2) -> dict[str, str]:
    """tuneloop's settings for the Airflow components: data DB, fake LLM, local MLflow store,
    offline Hugging Face, short retry delay and (optionally) CI-sized Param defaults."""
    env = {
        "DATABASE_URL": database_url,
        "TUNELOOP_LLM_BASE_URL": llm_base_url,
        "TUNELOOP_LLM_MODEL": "fake-model",
        "TUNELOOP_DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{data_dir}/mlflow.db",
        "TUNELOOP_RETRY_DELAY_S": f"{retry_delay_s:g}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if param_defaults:
        env["TUNELOOP_DAG_PARAM_DEFAULTS"] = json.dumps(param_defaults)
    return env


# ---- headless Chromium over the DevTools protocol ---------------------------------------------
class _DevTools:
    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, params: Mapping[str, Any] | None = None,
             timeout: float = 30) -> dict[str, Any]:
        self.next_id += 1
        message_id = self.next_id
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == message_id:  # anything else is an event: not needed here
                if "error" in reply:
                    raise HarnessError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        self.ws.close()


def chromium_screenshot(url: str, png: Path, *, wait_for_text: Sequence[str],
                        cookies: Sequence[Mapping[str, Any]] = (), timeout: float = 90,
                        window: tuple[int, int] = (1600, 1000)) -> Path:
    import httpx

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="tuneloop-chromium-"))  # fresh --user-data-dir
    log_path = png.with_suffix(".chromium.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size={window[0]},{window[1]}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    devtools: _DevTools | None = None
    text = ""
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError("chromium did not open its DevTools port:\n" + tail(log_path))
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        devtools = _DevTools(pages[0]["webSocketDebuggerUrl"])
        devtools.call("Emulation.setDeviceMetricsOverride", {
            "width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False})
        devtools.call("Network.enable")
        for cookie in cookies:
            devtools.call("Network.setCookie", dict(cookie))
        devtools.call("Page.enable")
        devtools.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while True:
            text = devtools.call("Runtime.evaluate", {
                "expression": "document.body ? document.body.innerText : ''",
                "returnByValue": True})["result"].get("value") or ""
            if all(needle in text for needle in wait_for_text):
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"{url} never showed {list(wait_for_text)}; page text:\n"
                                   f"{text[:2000]}")
            time.sleep(0.5)
        time.sleep(1.5)  # let the grid's cells and icons finish painting
        data = devtools.call("Page.captureScreenshot", {"format": "png"})["data"]
        png.write_bytes(base64.b64decode(data))
        png.with_suffix(".txt").write_text(text)
        return png
    finally:
        if devtools is not None:
            devtools.close()
        _terminate_groups([proc], timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


# ---- a PostgreSQL cluster the test owns ------------------------------------------------------
def postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL binaries, else the ones pgserver bundles."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                    else 0)
    if system:
        return system[-1].parent
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class PrivatePostgres:
    """initdb + pg_ctl on a temp dir and a free port, trust auth; `stop()`/`start()` at will.

    As root, PostgreSQL runs as the `postgres` system user (initdb refuses root).
    """

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise HarnessError("running as root needs a 'postgres' system user to own a "
                                   "private PostgreSQL cluster") from None
            self.user = "postgres"
            shutil.chown(self.root, user="postgres", group=None)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        result = subprocess.run([str(self.bin_dir / tool), *args], capture_output=True,
                                text=True, user=self.user, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise HarnessError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}\n{tail(self.log_path)}")

    def __enter__(self) -> PrivatePostgres:
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--no-sync")
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.root}")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def is_running(self) -> bool:
        result = subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                                 "status"], capture_output=True, user=self.user)
        return result.returncode == 0

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        if self.data_dir.exists() and self.is_running():
            try:
                self.stop("immediate")
            except HarnessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
