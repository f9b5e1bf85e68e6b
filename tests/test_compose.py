"""docker-compose.yml and the Dockerfile: services, wiring, and commands the real CLIs accept.

No Docker engine runs on the development machines, so these tests read the files instead of
starting them. Compose variables are filled in from .env.example the way Compose fills them in
from .env. Each service's command runs in a real ``sh`` whose ``PATH`` contains stub ``ray``
and ``jethpo`` executables that only record their arguments, so the shell expands a command as
it would in the container. Every recorded command is then parsed, without running, by the
real click command of jethpo (``hpo.cli.app``) or of Ray (``ray start``, ``ray status``), so an
unknown option, a bad value or a missing argument fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from hpo.cli import app as jethpo_app

try:
    # typer 0.29 bundles its own copy of click, whose exception classes differ from click's
    from typer._click.exceptions import UsageError as _TyperUsageError
except ImportError:
    _TyperUsageError = click.UsageError

__all__ = ["CommandLineError", "interpolate", "parse_command"]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

#: Services that run the jethpo image, and those of them on which trials run.
JETHPO_SERVICES = ("ray-head", "worker", "worker-gpu", "controller", "dashboard")
RAY_NODE_SERVICES = ("ray-head", "worker", "worker-gpu", "controller")
DATA_VOLUME = "jethpo-data"
DATA_DIR = "/data"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


# parsing with the real command lines


class CommandLineError(ValueError):
    """A command line that its program would reject: unknown command or option, invalid value."""


def parse_command(argv: Sequence[str]) -> click.Context:
    """Parse a ``jethpo`` or ``ray`` command line with the real click command, without running it.

    Options that are not on the command line are read from ``os.environ`` as the real
    command would read them.

    Args:
        argv: The command line, program first. The program may be a path, such as
            ``.venv/bin/jethpo``.

    Returns:
        The context of the innermost subcommand: ``command_path`` is, for example,
        ``"jethpo spaces add"``, and ``params`` contains the parsed values.

    Raises:
        CommandLineError: an unknown command or option, an invalid value, or a missing
            argument, with click's message.
        ValueError: the program is neither jethpo nor ray.
    """
    program, *args = argv
    name = os.path.basename(program)
    if name == "jethpo":
        command = typer.main.get_command(jethpo_app)
    elif name == "ray":
        from ray.scripts.scripts import cli as command
    else:
        raise ValueError(f"{program!r} is neither jethpo nor ray, so no command line parser is known for it.")

    try:
        context = command.make_context(name, list(args))
        while hasattr(context.command, "resolve_command"):
            # a group's context keeps the subcommand name and the arguments after it in these fields
            remaining = [*context._protected_args, *context.args]
            subcommand_name, subcommand, rest = context.command.resolve_command(context, remaining)
            context = subcommand.make_context(subcommand_name, rest, parent=context)
    except (click.UsageError, _TyperUsageError) as error:
        raise CommandLineError(f"{shlex.join(argv)}: {error.format_message()}") from None
    return context


# Compose files


class UndefinedVariableError(KeyError):
    """A required Compose variable, written ``${NAME:?message}``, is unset or empty."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Fill in Compose variables in a string as ``docker compose`` does.

    Supports ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
    ``${NAME:?message}``, ``${NAME?message}``, ``${NAME:+value}``, ``${NAME+value}`` and
    ``$$`` for a literal ``$``. Nested variables inside a default are not supported.

    Raises:
        UndefinedVariableError: a required variable is unset (or empty, with ``:?``).
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value = variables.get(name)
        operator = match["operator"] or ""
        unset = value is None or (operator.startswith(":") and value == "")
        if operator.endswith("-"):
            return match["argument"] if unset else value
        if operator.endswith("?"):
            if unset:
                raise UndefinedVariableError(f"{name}: {match['argument']}")
            return value
        if operator.endswith("+"):
            return "" if unset else match["argument"]
        return value or ""

    return _VARIABLE.sub(replace, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines of a Compose .env file, skipping blank lines and comments."""
    variables = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: line {line!r} is not KEY=VALUE"
        variables[key.strip()] = value.strip()
    return variables


def load_compose(variables: Mapping[str, str]) -> dict[str, Any]:
    """Load docker-compose.yml with its variables filled in and its x- extension fields removed."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    document = {key: value for key, value in document.items() if not key.startswith("x-")}
    return _interpolate_tree(document, variables)


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def service_volumes(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Return ``(source, target, mode)`` of each short-syntax volume of a service."""
    volumes = []
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        volumes.append((source, target, mode[0] if mode else "rw"))
    return volumes


def published_ports(service: Mapping[str, Any]) -> list[dict[str, str]]:
    """Return ``host_ip``, ``published`` and ``target`` of each published port of a service."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append({key: str(entry.get(key, "")) for key in ("host_ip", "published", "target")})
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        ports.append({"host_ip": host_ip, "published": parts[-2] if len(parts) > 1 else "", "target": parts[-1]})
    return ports


# the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's ``(INSTRUCTION, arguments)`` pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Split the Dockerfile's instructions into build stages, each starting with its FROM."""
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments))
    return stages


def image_command(instruction: str) -> list[str]:
    """Return the final stage's ENTRYPOINT or CMD as a list."""
    values = [arguments for name, arguments in dockerfile_stages()[-1] if name == instruction]
    assert values, f"the Dockerfile's final stage has no {instruction}"
    return json.loads(values[-1])


def service_argv(service: Mapping[str, Any]) -> list[str]:
    """Return the command line a service's container runs: its entrypoint, then its command.

    An ``entrypoint`` in the service replaces the image's ENTRYPOINT and also drops the
    image's CMD, as Docker does.
    """
    if "entrypoint" in service:
        entrypoint = service["entrypoint"]
        default_command: list[str] = []
    else:
        entrypoint = image_command("ENTRYPOINT")
        default_command = image_command("CMD")
    command = service.get("command", default_command)
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(part) for part in entrypoint + command]


def record_invocations(argv: Sequence[str], environment: Mapping[str, str], tmp_path: Path) -> list[list[str]]:
    """Run a command line with stub ``ray`` and ``jethpo`` executables and return what they received.

    Args:
        argv: A container's command line, such as ``["/bin/sh", "-c", "ray start ... && exec jethpo run ..."]``.
        environment: The container's environment.
        tmp_path: Folder for the stubs and their log.

    Returns:
        One command line per stub call, program name first.
    """
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "invocations.jsonl"
    for program in ("ray", "jethpo"):
        stub = stubs / program
        stub.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            "with open(os.environ['STUB_LOG'], 'a') as log:\n"
            "    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        )
        stub.chmod(0o755)

    search_path = f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin"
    executable = shutil.which(argv[0], path=search_path)
    assert executable, f"{argv[0]!r} is not a stub and not found in /usr/bin or /bin"
    env = {**environment, "PATH": search_path, "STUB_LOG": str(log)}
    subprocess.run([executable, *argv[1:]], env=env, cwd=tmp_path, check=True, timeout=60)
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def parse_in_environment(argv: Sequence[str], environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """Parse a command line with the container's environment in place of this process's."""
    for name in list(os.environ):
        if name.startswith(("JETHPO_", "RAY_")):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return parse_command(argv)


# fixtures


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env_example) -> dict[str, Any]:
    return load_compose(env_example)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture
def invocations(services, tmp_path):
    """Provide ``run(service, **overrides)``, which runs a service's command with the stubs.

    ``run`` returns the recorded calls and the environment they ran in: the service's own,
    with the overrides set on top.
    """

    def run(name: str, **overrides: str) -> tuple[list[list[str]], dict[str, str]]:
        environment = {**service_environment(services[name]), **overrides}
        return record_invocations(service_argv(services[name]), environment, tmp_path / name), environment

    return run


def _head_address(services: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    head = parse_in_environment(service_argv(services["ray-head"]), service_environment(services["ray-head"]), monkeypatch)
    return f"ray-head:{head.params['port']}"


# services and their wiring


def test_compose_services():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]

    assert set(services) == {"postgres", "ray-head", "worker", "worker-gpu", "controller", "dashboard"}


def test_postgres_password_from_env_file(env_example, services):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())

    assert env_example["POSTGRES_PASSWORD"]
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env_example["POSTGRES_PASSWORD"]
    with pytest.raises(UndefinedVariableError, match="POSTGRES_PASSWORD"):
        load_compose({key: value for key, value in env_example.items() if key != "POSTGRES_PASSWORD"})


def test_storage_url_reaches_postgres_service(env_example, services):
    postgres = services["postgres"]["environment"]
    expected = (
        f"postgresql://{postgres['POSTGRES_USER']}:{env_example['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )

    for name in JETHPO_SERVICES:
        assert service_environment(services[name])["JETHPO_STORAGE"] == expected, name


def test_postgres_data_on_named_volume(compose, services):
    assert ("postgres-data", "/var/lib/postgresql/data", "rw") in service_volumes(services["postgres"])
    assert "postgres-data" in compose["volumes"]


def test_postgres_healthcheck_uses_pg_isready(services):
    postgres = services["postgres"]
    test = postgres["healthcheck"]["test"]

    assert test[:2] == ["CMD", "pg_isready"]
    assert f"--username={postgres['environment']['POSTGRES_USER']}" in test
    assert f"--dbname={postgres['environment']['POSTGRES_DB']}" in test
    pg_isready = shutil.which("pg_isready") or shutil.which("pg_isready", path="/usr/lib/postgresql/15/bin")
    if pg_isready is None:
        pytest.skip("pg_isready is not installed here, so its options cannot be checked")
    help_text = subprocess.run([pg_isready, "--help"], capture_output=True, text=True, check=True).stdout
    for argument in test[2:]:
        assert argument.split("=")[0] in help_text, argument


def test_depends_on_waits_for_healthy(services):
    for name, service in services.items():
        for dependency, settings in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert settings == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "test" in services[dependency].get("healthcheck", {}), f"{dependency} has no healthcheck"


def test_start_order(services):
    def dependencies(name: str) -> set[str]:
        return set(services[name].get("depends_on") or {})

    assert dependencies("worker") == {"ray-head"}
    assert dependencies("worker-gpu") == {"ray-head"}
    assert dependencies("controller") == {"postgres", "ray-head", "worker"}
    assert dependencies("dashboard") == {"postgres"}


def test_controller_stop_grace_covers_hand_back(services):
    from hpo.workers import HAND_BACK_LIMIT_S

    grace = services["controller"]["stop_grace_period"]

    assert grace.endswith("s")
    assert int(grace[:-1]) > HAND_BACK_LIMIT_S


@pytest.mark.parametrize("port_variable", [None, "JETHPO_DASHBOARD_PORT", "RAY_DASHBOARD_PORT"])
def test_ports_bind_to_localhost(env_example, port_variable):
    variables = dict(env_example)
    if port_variable:
        variables[port_variable] = "18000"
    services = load_compose(variables)["services"]

    for name, service in services.items():
        for port in published_ports(service):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_dashboards_published(services, monkeypatch):
    ray_head = parse_in_environment(service_argv(services["ray-head"]), service_environment(services["ray-head"]), monkeypatch)
    dashboard = parse_in_environment(service_argv(services["dashboard"]), service_environment(services["dashboard"]), monkeypatch)

    assert [port["target"] for port in published_ports(services["ray-head"])] == [str(ray_head.params["dashboard_port"])]
    assert [port["target"] for port in published_ports(services["dashboard"])] == [str(dashboard.params["port"])]
    for name in ("postgres", "worker", "worker-gpu", "controller"):
        assert published_ports(services[name]) == [], name


def test_jethpo_services_share_data_volume(compose, services):
    assert DATA_VOLUME in compose["volumes"]
    for name in JETHPO_SERVICES:
        volumes = service_volumes(services[name])
        environment = service_environment(services[name])

        assert (DATA_VOLUME, DATA_DIR, "rw") in volumes, name
        assert environment["JETHPO_DATA_DIR"] == DATA_DIR, name
        assert Path(environment["JETHPO_ARTIFACTS"]).is_relative_to(DATA_DIR), name
        writable = [(source, target) for source, target, mode in volumes if mode != "ro"]
        assert writable == [(DATA_VOLUME, DATA_DIR)], name


def test_jets_folder_mounted_read_only(env_example, services):
    for name in RAY_NODE_SERVICES:
        assert (env_example["JETHPO_JETS_DIR"], "/jets", "ro") in service_volumes(services[name]), name


# commands


@pytest.mark.parametrize("name", ["ray-head", "worker", "worker-gpu"])
def test_ray_node_commands_parse(name, invocations, monkeypatch):
    calls, environment = invocations(name)

    assert len(calls) == 1
    start = parse_in_environment(calls[0], environment, monkeypatch)
    assert start.command_path == "ray start"
    assert start.params["block"] is True


def test_ray_head_serves_dashboard(invocations, monkeypatch):
    (call,), environment = invocations("ray-head")
    head = parse_in_environment(call, environment, monkeypatch)

    assert head.params["head"] is True
    assert head.params["include_dashboard"] is True
    assert head.params["dashboard_host"] == "0.0.0.0"
    assert head.params["num_cpus"] == 0


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_worker_nodes_join_head(name, services, invocations, monkeypatch, env_example):
    (call,), environment = invocations(name)
    worker = parse_in_environment(call, environment, monkeypatch)

    assert worker.params["address"] == _head_address(services, monkeypatch)
    assert worker.params["num_cpus"] == int(env_example["JETHPO_WORKER_CPUS"])
    assert worker.params["head"] is False


def test_controller_joins_then_runs(services, invocations, monkeypatch, env_example):
    calls, environment = invocations("controller")

    assert [call[:2] for call in calls] == [["ray", "start"], ["jethpo", "run"]]
    node = parse_in_environment(calls[0], environment, monkeypatch)
    run = parse_in_environment(calls[1], environment, monkeypatch)
    assert node.params["address"] == _head_address(services, monkeypatch)
    assert node.params["block"] is False
    assert node.params["num_cpus"] == 0
    assert run.params["address"] == _head_address(services, monkeypatch)
    assert run.params["profile"] == env_example["JETHPO_PROFILE"]
    assert str(run.params["artifacts"]) == environment["JETHPO_ARTIFACTS"]
    assert run.params["data"] is None
    assert run.params["workers"] is None


def test_controller_takes_jets_file_and_workers(invocations, monkeypatch):
    calls, environment = invocations(
        "controller", JETHPO_PROFILE="smoke", JETHPO_DATA="/jets/gluon jets.hdf5", JETHPO_WORKERS="3"
    )

    run = parse_in_environment(calls[-1], environment, monkeypatch)
    assert run.params["data"] == "/jets/gluon jets.hdf5"
    assert run.params["workers"] == 3


def test_controller_profile_from_env_file(env_example):
    services = load_compose({**env_example, "JETHPO_PROFILE": "smoke"})["services"]

    assert "--profile=smoke" in service_argv(services["controller"])[-1]


def test_dashboard_command_parses(invocations, monkeypatch):
    (call,), environment = invocations("dashboard")
    dashboard = parse_in_environment(call, environment, monkeypatch)

    assert dashboard.command_path == "jethpo dashboard"
    assert dashboard.params["host"] == "0.0.0.0"
    assert str(dashboard.params["artifacts"]) == environment["JETHPO_ARTIFACTS"]


@pytest.mark.parametrize("name", ["ray-head", "worker", "worker-gpu"])
def test_ray_healthchecks_parse(name, services, monkeypatch):
    test = services[name]["healthcheck"]["test"]

    assert test[0] == "CMD"
    status = parse_in_environment(test[1:], service_environment(services[name]), monkeypatch)
    assert status.command_path == "ray status"


def test_dashboard_healthcheck_polls_its_port(services, monkeypatch):
    dashboard = parse_in_environment(service_argv(services["dashboard"]), service_environment(services["dashboard"]), monkeypatch)
    test = services["dashboard"]["healthcheck"]["test"]

    assert test[:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{dashboard.params['port']}/" in test[3]


def test_ray_nodes_use_token_auth(env_example, services):
    for name in RAY_NODE_SERVICES:
        environment = service_environment(services[name])

        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == env_example["RAY_AUTH_TOKEN"], name


# scaling and GPUs


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_workers_scale(name, services):
    service = services[name]

    assert "container_name" not in service
    assert "hostname" not in service
    assert "ports" not in service


def test_gpu_worker_reserves_gpus(services, env_example):
    gpu_worker = services["worker-gpu"]
    (device,) = gpu_worker["deploy"]["resources"]["reservations"]["devices"]

    assert gpu_worker["profiles"] == ["gpu"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device["count"] == env_example["JETHPO_GPUS_PER_WORKER"]
    assert "/whl/cu" in gpu_worker["build"]["args"]["TORCH_INDEX"]
    assert gpu_worker["image"] != services["worker"]["image"]


def test_only_gpu_worker_in_profile(services):
    in_profiles = {name for name, service in services.items() if service.get("profiles")}

    assert in_profiles == {"worker-gpu"}


def test_env_example_matches_compose(env_example):
    text = COMPOSE_FILE.read_text()
    used = {match["braced"] or match["named"] for match in _VARIABLE.finditer(text) if not match["escaped"]}
    required = {match["braced"] for match in _VARIABLE.finditer(text) if (match["operator"] or "").endswith("?")}

    assert required <= set(env_example), required - set(env_example)
    assert set(env_example) <= used, set(env_example) - used


def test_shell_variables_set_in_environment(services):
    for name, service in services.items():
        argv = service_argv(service) if name != "postgres" else []
        if argv[:2] != ["/bin/sh", "-c"]:
            continue
        # after Compose's interpolation, $NAME and ${NAME...} are left for the container's shell
        read = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", argv[2]))

        assert read <= set(service_environment(service)), f"{name} reads unset variables {read - set(service_environment(service))}"


# the Dockerfile


def test_dockerfile_is_multi_stage():
    stages = dockerfile_stages()
    final = stages[-1]

    assert len(stages) >= 2
    copies = [arguments for instruction, arguments in final if instruction == "COPY"]
    assert any(arguments.startswith("--from=build ") for arguments in copies), copies
    assert not any(instruction == "RUN" and "pip install" in arguments for instruction, arguments in final)


def test_dockerfile_base_image_argument():
    instructions = dockerfile_instructions()
    first_from = next(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    global_args = dict(arguments.split("=", 1) for instruction, arguments in instructions[:first_from] if instruction == "ARG")

    assert global_args["BASE_IMAGE"].startswith("python:3.11")
    assert instructions[first_from][1].startswith("${BASE_IMAGE} ")


def test_dockerfile_cpu_torch_by_default():
    build_args = {
        name: default
        for instruction, arguments in dockerfile_instructions()
        if instruction == "ARG"
        for name, _, default in [arguments.partition("=")]
    }
    runs = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN"]

    assert build_args["TORCH_INDEX"].endswith("/whl/cpu")
    assert any('--index-url "${TORCH_INDEX}"' in run for run in runs)


def test_dockerfile_runs_as_non_root():
    users = [arguments for instruction, arguments in dockerfile_stages()[-1] if instruction == "USER"]

    assert users, "the final stage sets no USER, so the container runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_installs_cli_at_build():
    build = next(stage for stage in dockerfile_stages() if stage[0][1].endswith(" AS build"))
    runs = [arguments for instruction, arguments in build if instruction == "RUN"]
    copied = {arguments.split()[0] for instruction, arguments in build if instruction == "COPY"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}

    assert packages <= copied, f"the image misses the packages {packages - copied}"
    assert any("pip install --no-cache-dir /src" in run and "jethpo --version" in run for run in runs)
    assert image_command("ENTRYPOINT") == ["jethpo"]


def test_compose_build_args_declared():
    declared = {arguments.partition("=")[0] for instruction, arguments in dockerfile_instructions() if instruction == "ARG"}
    raw = yaml.safe_load(COMPOSE_FILE.read_text())

    for name, service in raw["services"].items():
        build = service.get("build") or {}
        if isinstance(build, dict):
            assert set(build.get("args") or {}) <= declared, name
