"""docker-compose.yml run end to end: the services' own commands as local processes.

No Docker engine runs on the development machines, so this test plays Compose. It reads each
service's command and environment from docker-compose.yml, filled in from .env.example as
Compose fills them in from .env, and starts them in the order of their ``depends_on``
conditions: the dashboard and the Ray head, then two ``worker`` services, then the
controller, whose ``/bin/sh -c`` command joins the cluster and runs the smoke profile. It
then checks the dashboard over HTTP and the final results table.

Only what cannot be the same when every container is a process on one machine is changed:

- ``ray-head:<port>`` becomes this machine's IP address and a free port. All Ray nodes
  share that IP address, as the containers share the ``ray-head`` service name.
- Published and fixed ports become free ports, and both dashboards listen on 127.0.0.1.
- ``/data``, the shared volume, becomes a temporary folder.
- JETHPO_STORAGE names a throwaway database on the local PostgreSQL server.
- Each Ray node gets its own temp dir, worker port range, dashboard agent port and a small
  object store, because four nodes share one /dev/shm and the other Ray instances of this
  machine use the default ports.

The Compose variables JETHPO_PROFILE (smoke), JETHPO_DATA (the session's Pythia jets) and
RAY_AUTH_TOKEN (a random token) are set the way a user sets them in .env, so Ray token
authentication stays on. Everything else comes from the compose file as written, so a
wrong option or a broken ``depends_on`` order fails this test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest

from storage import StageState, get_stages, open_storage
from test_compose import (
    DATA_DIR,
    ENV_EXAMPLE,
    load_compose,
    parse_command,
    read_env_file,
    service_argv,
    service_environment,
)
from test_workers import free_port, free_port_range, stop_process_group

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

TESTS_DIR = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
JETHPO = VENV_BIN / "jethpo"

#: The Compose service name that every Ray node and the controller use to reach the head.
HEAD_SERVICE = "ray-head"
#: Search stages of the smoke profile, each an Optuna study of the same name.
SMOKE_STUDIES = {"convae-gen.loss", "convae-rec.loss", "nf.search", "convae-gen.arch", "convae-rec.arch"}
MODELS = ("convae", "convae-nf", "nf")

# With two 2-CPU worker nodes on a 2-core machine, the controller of this test took about
# 2 minutes, and 4.5 minutes while other jobs were using the machine.
CONTROLLER_TIMEOUT_S = 900
NODES_TIMEOUT_S = 120
DASHBOARD_TIMEOUT_S = 60
# Ray nodes on one machine share /dev/shm, so each gets a small object store.
OBJECT_STORE_BYTES = 200 * 1024**2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# rewriting the services for one machine


class Rewriter:
    """Substitutions that run a service's container command and environment as a process on this machine.

    Args:
        head_port: The port in the compose file's head address, ``ray-head:<head_port>``.
        head_address: ``IP:port`` of the local head node that replaces it.
        data_dir: Local folder that replaces the ``/data`` volume.
        storage_url: Storage URL that replaces JETHPO_STORAGE.
    """

    def __init__(self, head_port: int, head_address: str, data_dir: Path, storage_url: str) -> None:
        self.service_address = f"{HEAD_SERVICE}:{head_port}"
        self.head_address = head_address
        self.data_dir = data_dir
        self.storage_url = storage_url
        # /data as a whole path or as the first component of one, not /database or /data2
        self._data_path = re.compile(rf"(?<![\w./-]){re.escape(DATA_DIR)}(?![\w.-])")

    def text(self, value: str) -> str:
        value = value.replace(self.service_address, self.head_address)
        return self._data_path.sub(str(self.data_dir), value)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [self.text(argument) for argument in argv]

    def environment(self, service: Mapping[str, Any]) -> dict[str, str]:
        """Return the service's environment, rewritten, on top of this process's minus its JETHPO_ and RAY_ variables."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("JETHPO_", "RAY_"))}
        environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '/usr/bin:/bin')}"
        environment["PYTHONUNBUFFERED"] = "1"
        service_env = service_environment(service)
        assert "JETHPO_STORAGE" in service_env, "the compose file sets no JETHPO_STORAGE"
        for key, value in service_env.items():
            environment[key] = self.text(value)
        environment["JETHPO_STORAGE"] = self.storage_url
        return environment


def replace_option(argv: Sequence[str], option: str, value: str) -> list[str]:
    """Replace the value of an option written once as ``--option=value`` or ``--option value``."""
    argv = list(argv)
    positions = [index for index, argument in enumerate(argv) if argument == option or argument.startswith(f"{option}=")]
    assert len(positions) == 1, f"{option} occurs {len(positions)} times in {shlex.join(argv)}"
    index = positions[0]
    if argv[index] == option:
        argv[index + 1] = value
    else:
        argv[index] = f"{option}={value}"
    return argv


def node_options(temp_dir: Path, head: bool) -> list[str]:
    """Return the ``ray start`` options that keep Ray nodes on one machine apart."""
    low, high = free_port_range()
    options = [
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={high}",
    ]
    if head:
        options.append(f"--ray-client-server-port={free_port()}")
    return options


def node_ip_address() -> str:
    """Return the IP address that Ray nodes started on this machine register with."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


# processes


class Service:
    """A service's process, started in a process group of its own with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        with open(log, "w") as output:
            self.process = subprocess.Popen(
                self.argv, stdout=output, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
            )

    def output(self, max_chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name}: {shlex.join(self.argv)}\n{text[-max_chars:]}"

    def assert_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"{self.name} exited with code {code}.\n{self.output()}"


@pytest.fixture
def services_started() -> Iterator[list[Service]]:
    """List to which the test appends its services; every process group is stopped afterwards.

    The controller's ``ray start`` leaves its Ray node running in the controller's process
    group after ``jethpo run`` exits, so stopping the group stops that node too. ``ray stop``
    is never used, because it stops every Ray node of this machine, other users' included.
    """
    started: list[Service] = []
    yield started
    for service in reversed(started):
        stop_process_group(service.process)


def wait_for_nodes_with_token(address: str, count: int, env: Mapping[str, str]) -> None:
    """Wait until ``count`` Ray nodes are alive, connecting from a child process with the nodes' environment.

    Ray reads RAY_AUTH_MODE once per process, so this test process never connects with a
    token: later tests of the session connect it to clusters that run without one.
    """
    script = "import sys; from test_workers import wait_for_nodes; wait_for_nodes(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))"
    environment = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", script, address, str(count), str(NODES_TIMEOUT_S)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=NODES_TIMEOUT_S + 120,
    )
    assert result.returncode == 0, f"waiting for {count} Ray nodes at {address} failed:\n{result.stderr[-4000:]}"


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> tuple[int, str, bytes]:
    """Return the status, Content-Type and body of a GET request, following redirects.

    An HTTP error status is returned like any other, and only a failed connection raises.
    """
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def wait_for_http_ok(url: str, service: Service, headers: Mapping[str, str] | None = None) -> None:
    deadline = time.monotonic() + DASHBOARD_TIMEOUT_S
    while time.monotonic() < deadline:
        service.assert_running()
        try:
            status, _, _ = http_get(url, headers, timeout_s=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = None
        if status == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"Timed out after {DASHBOARD_TIMEOUT_S} s waiting for HTTP 200 from {url}.\n{service.output()}")


def unfinished_stages(storage_url: str, pipeline: str) -> str:
    """Return one line per stage of a pipeline that is not done, with its state and claimer."""
    storage = open_storage(storage_url, heartbeat_interval=None)
    try:
        stages = get_stages(storage.engine, pipeline)
    finally:
        storage.engine.dispose()
    lines = [
        f"{stage.stage}: {stage.state.value}, claimed by {stage.claimed_by}"
        for stage in stages
        if stage.state != StageState.DONE
    ]
    return "\n".join(lines) or "none"


def get_json(url: str) -> Any:
    status, content_type, body = http_get(url)
    assert status == 200, url
    assert content_type.startswith("application/json"), (url, content_type)
    return json.loads(body)


# the test


def test_compose_services_run_smoke_profile(module_postgres_url, pythia_jets, tmp_path_factory, services_started):
    folder = tmp_path_factory.mktemp("compose")
    data_dir = folder / "data"
    data_dir.mkdir()
    # a short path, because Ray's Unix socket paths under each node's temp dir must stay below 108 characters
    ray_dir = tmp_path_factory.mktemp("ray")

    variables = {
        **read_env_file(ENV_EXAMPLE),
        "JETHPO_PROFILE": "smoke",
        "JETHPO_DATA": str(Path(pythia_jets.path).resolve()),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    compose = load_compose(variables)["services"]
    head_port = parse_command(service_argv(compose["ray-head"])).params["port"]
    local_head_port = free_port()
    head_address = f"{node_ip_address()}:{local_head_port}"
    rewrite = Rewriter(head_port, head_address, data_dir, module_postgres_url)

    def start(name: str, service_name: str, argv: Sequence[str]) -> Service:
        env = rewrite.environment(compose[service_name])
        service = Service(name, argv, env, data_dir, folder / f"{name}.log")
        services_started.append(service)
        return service

    # dashboard: depends only on postgres, so it starts on an empty database
    dashboard_port = free_port()
    dashboard_argv = rewrite.argv(service_argv(compose["dashboard"]))
    dashboard_argv = replace_option(dashboard_argv, "--host", "127.0.0.1")
    dashboard_argv = replace_option(dashboard_argv, "--port", str(dashboard_port))
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    dashboard = start("dashboard", "dashboard", dashboard_argv)

    # ray-head
    head_argv = rewrite.argv(service_argv(compose["ray-head"]))
    head_argv = replace_option(head_argv, "--port", str(local_head_port))
    ray_dashboard_port = free_port()
    head_argv = replace_option(head_argv, "--dashboard-port", str(ray_dashboard_port))
    head_argv = replace_option(head_argv, "--dashboard-host", "127.0.0.1")
    head = start("ray-head", "ray-head", [*head_argv, *node_options(ray_dir / "h", head=True)])
    node_env = rewrite.environment(compose["ray-head"])
    wait_for_nodes_with_token(head_address, 1, node_env)
    head.assert_running()

    # two replicas of worker, as `docker compose up --scale worker=2`
    worker_argv = rewrite.argv(service_argv(compose["worker"]))
    workers = [
        start(f"worker-{index}", "worker", [*worker_argv, *node_options(ray_dir / f"w{index}", head=False)])
        for index in (1, 2)
    ]
    wait_for_nodes_with_token(head_address, 3, node_env)
    for worker in workers:
        worker.assert_running()
    wait_for_http_ok(f"{dashboard_url}/", dashboard)

    # the Ray dashboard of the head requires the token from RAY_AUTH_TOKEN
    ray_dashboard_url = f"http://127.0.0.1:{ray_dashboard_port}"
    wait_for_http_ok(f"{ray_dashboard_url}/api/version", head, {"Authorization": f"Bearer {variables['RAY_AUTH_TOKEN']}"})
    assert get_json(f"{ray_dashboard_url}/api/authentication_mode") == {"authentication_mode": "token"}
    status, _, _ = http_get(f"{ray_dashboard_url}/api/version")
    assert status == 401

    # controller: /bin/sh -c "ray start ... && exec jethpo run ..."
    shell, flag, script = rewrite.argv(service_argv(compose["controller"]))
    assert (shell, flag) == ("/bin/sh", "-c")
    assert script.count("ray start ") == 1, script
    script = script.replace("ray start ", f"ray start {shlex.join(node_options(ray_dir / 'c', head=False))} ")
    controller = start("controller", "controller", [shell, flag, script])
    try:
        code = controller.process.wait(timeout=CONTROLLER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    logs = "\n".join(service.output() for service in services_started)
    assert code is not None, (
        f"The controller timed out after {CONTROLLER_TIMEOUT_S} s. Stages of pipeline smoke that are not done:\n"
        f"{unfinished_stages(module_postgres_url, 'smoke')}\n"
        f"The jethpo workers log to {ray_dir}/*/session_*/logs/worker-*.err.\n{logs}"
    )
    assert code == 0, logs
    for service in (head, *workers, dashboard):
        service.assert_running()

    # jethpo results, in the controller's environment as `docker compose exec controller` runs it
    env = rewrite.environment(compose["controller"])
    results = subprocess.run([str(JETHPO), "results", "--json"], env=env, cwd=data_dir, capture_output=True, text=True, timeout=120)
    assert results.returncode == 0, results.stderr
    rows = json.loads(results.stdout)["rows"]
    models = {row["model"] for row in rows if not row.get("published") and row.get("model") in MODELS}
    assert models == set(MODELS)
    truth = [row for row in rows if "truth" in str(row.get("label", "")).lower()]
    assert len(truth) == 1, rows
    published = [row for row in rows if row.get("published")]
    assert published, rows

    # the dashboard lists the studies of the database
    storage = open_storage(module_postgres_url, heartbeat_interval=None)
    try:
        stored = {summary.study_name: summary._study_id for summary in optuna.get_all_study_summaries(storage)}
    finally:
        storage.engine.dispose()
    listed = {study["study_name"]: study["study_id"] for study in get_json(f"{dashboard_url}/api/studies")["study_summaries"]}
    assert SMOKE_STUDIES <= set(listed)
    assert listed == stored

    # a plot that the pipeline attached to a study comes back over HTTP
    png = None
    for study_name, study_id in sorted(listed.items()):
        artifacts = get_json(f"{dashboard_url}/api/studies/{study_id}")["artifacts"]
        png = next((artifact for artifact in artifacts if artifact["mimetype"] == "image/png"), None)
        if png is not None:
            break
    assert png is not None, "no study has a PNG artifact"
    status, content_type, body = http_get(f"{dashboard_url}/artifacts/{study_id}/{png['artifact_id']}")
    assert status == 200
    assert content_type == "image/png"
    assert body.startswith(PNG_SIGNATURE), (study_name, png["filename"])
