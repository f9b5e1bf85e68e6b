"""The README's commands and examples work as written.

Every command line in the README's ``sh`` code blocks is checked. The real command line
parsers read the ``jethpo`` and ``ray`` command lines, ``docker compose`` command lines must
match docker-compose.yml, and .ci/run must run the install and test commands. A command with
any other program fails the test until a check for it is added here.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy
import yaml

from hpo.spaces import parse_space

# test_compose.py, in this folder, contains the command line parser and the Compose file reader
from test_compose import CommandLineError, load_compose, parse_command, read_env_file

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
ENV_EXAMPLE = ROOT / ".env.example"
PROFILES = ROOT / "hpo" / "profiles"

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<language>[\w-]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
_SEPARATORS = {"&&", "||", ";", "|"}
_CHECKED_PROGRAMS = {"python3.11", ".venv/bin/pip", ".venv/bin/python", "jethpo", "ray", "docker", "cp", "createdb", "export"}
_COMPOSE_SUBCOMMANDS = {"up", "down", "stop", "start", "restart", "exec", "logs", "ps", "build"}


def code_blocks(language: str) -> list[str]:
    """Return the bodies of the README's fenced code blocks in a language, dedented."""
    return [
        textwrap.dedent(match["body"])
        for match in _FENCE.finditer(README.read_text())
        if match["language"] == language
    ]


def split_commands(block: str) -> list[list[str]]:
    """Split a shell code block into simple commands, as token lists without comments.

    Lines ending in a backslash continue on the next line, and ``&&``, ``||``, ``;`` and
    ``|`` separate commands.
    """
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token in _SEPARATORS:
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    return [command for command in commands if command]


def readme_commands() -> list[list[str]]:
    return [command for block in code_blocks("sh") for command in split_commands(block)]


def program(command: list[str]) -> str:
    """Return the program of a command, with ``.venv/bin/jethpo`` and other paths of jethpo as ``jethpo``."""
    return "jethpo" if os.path.basename(command[0]) == "jethpo" else command[0]


def commands_of(name: str) -> list[list[str]]:
    return [command for command in readme_commands() if program(command) == name]


@pytest.fixture
def clean_environment(monkeypatch):
    """Remove JETHPO_ and RAY_ variables, which would fill in options the README leaves out."""
    for name in list(os.environ):
        if name.startswith(("JETHPO_", "RAY_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def compose_services() -> dict:
    return load_compose(read_env_file(ENV_EXAMPLE))["services"]


def test_readme_space_example_is_valid():
    blocks = code_blocks("yaml")
    assert len(blocks) == 1

    space = parse_space(blocks[0], "README.md")

    assert space.name == "convae-small"
    assert [stage.name for stage in space.stages] == ["loss", "arch"]


def test_readme_code_blocks_are_checked():
    text = README.read_text()
    languages = [match["language"] for match in _FENCE.finditer(text)]
    outside_fences = _FENCE.sub("", text)

    assert set(languages) <= {"sh", "yaml", "dotenv"}, languages
    assert text.count("```") == 2 * len(languages), "a code fence is not closed"
    # a command in an indented code block would escape the checks below
    assert not re.findall(r"^ {4,}(?:\.venv/|jethpo |ray |docker |python)", outside_fences, flags=re.M)


def test_readme_commands_have_checks():
    unchecked = [shlex.join(command) for command in readme_commands() if program(command) not in _CHECKED_PROGRAMS]

    assert unchecked == [], "add a check to tests/test_readme.py for these README commands"


def test_readme_first_commands_run_in_ci(clean_environment):
    first, second = code_blocks("sh")[:2]
    install = split_commands(first)[:-1]
    test = split_commands(second)
    ci_lines = [shlex.split(line) for line in CI_SCRIPT.read_text().splitlines() if line.strip() and not line.startswith("#")]

    for command in install + test:
        assert command in ci_lines, f".ci/run does not run the README's {shlex.join(command)!r}"
    positions = [ci_lines.index(command) for command in install + test]
    assert positions == sorted(positions), ".ci/run runs the README's commands in another order"
    assert test == [[".venv/bin/python", "-m", "pytest"]]


def test_readme_first_run_uses_defaults(clean_environment, tmp_path):
    from hpo.cli import _profile_to_run

    run = split_commands(code_blocks("sh")[0])[-1]

    context = parse_command(run)

    assert context.command_path == "jethpo run"
    # without --profile, a storage without a pipeline runs the quick profile
    assert context.params["profile"] is None
    assert _profile_to_run(f"sqlite:///{tmp_path / 'jethpo.db'}") == "quick"
    assert context.params["storage"] is None
    assert context.params["address"] is None
    assert context.params["data"] is None


@pytest.mark.parametrize("command", commands_of("jethpo"), ids=shlex.join)
def test_readme_jethpo_command_parses(command, clean_environment):
    try:
        context = parse_command(command)
    except CommandLineError as error:
        pytest.fail(str(error), pytrace=False)

    assert context.command_path.startswith("jethpo ")


@pytest.mark.parametrize("command", commands_of("ray"), ids=shlex.join)
def test_readme_ray_command_parses(command, clean_environment):
    try:
        context = parse_command(command)
    except CommandLineError as error:
        pytest.fail(str(error), pytrace=False)

    assert context.command_path == "ray start"


@pytest.mark.parametrize("command", commands_of("docker"), ids=shlex.join)
def test_readme_compose_command_matches_file(command, compose_services, clean_environment):
    assert command[1] == "compose", "docker commands in the README go through docker compose"
    arguments = command[2:]
    profiles = {profile for service in compose_services.values() for profile in service.get("profiles", [])}
    while arguments[0].startswith("--"):
        option, value, *arguments = arguments
        assert option == "--profile", option
        assert value in profiles, value

    subcommand, *rest = arguments
    assert subcommand in _COMPOSE_SUBCOMMANDS, subcommand
    if subcommand == "exec":
        # flags of exec come before the service, so a flag with a value must be written --flag=value
        while rest[0].startswith("-"):
            rest = rest[1:]
        service, *inner = rest
        assert service in compose_services
        assert compose_services[service].get("image", "").startswith("jethpo:"), f"{service} does not run jethpo"
        parse_command(inner)
    for argument, value in zip(rest, rest[1:]):
        if argument == "--scale":
            service, _, count = value.partition("=")
            assert service in compose_services, service
            assert int(count) >= 0
            assert "container_name" not in compose_services[service]
            assert "ports" not in compose_services[service]


def test_readme_copied_files_exist():
    for command in commands_of("cp"):
        assert (ROOT / command[1]).is_file(), command


def test_readme_settings_exist_in_env_example():
    settings = read_env_file(ENV_EXAMPLE)

    for block in code_blocks("dotenv"):
        for line in block.splitlines():
            name = line.partition("=")[0]
            assert name in settings, f"README sets {name}, which .env.example does not have"


def test_readme_profiles_table_matches_profiles():
    rows = {
        cells[0]: cells
        for line in README.read_text().splitlines()
        if line.startswith("| ")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }

    for path in sorted(PROFILES.glob("*.yaml")):
        profile = yaml.safe_load(path.read_text())
        convae = profile["models"]["convae"]["search"]
        flat_nf = profile["models"]["realnvp-flat"]["search"]
        row = rows[profile["name"]]

        assert row[1].startswith(f"{convae['n_trials']} trials x {convae['epochs']} epochs"), row
        assert row[2].startswith(f"{flat_nf['n_trials']} trials x {flat_nf['epochs']} epochs"), row
        assert row[4] == ("all" if profile["n_jets"] is None else str(profile["n_jets"])), row


def test_readme_postgres_setup_works(postgres_admin_url):
    [createdb] = commands_of("createdb")
    [export] = commands_of("export")
    variable, _, url = export[1].partition("=")
    storage_url = sqlalchemy.make_url(url)
    options = dict(zip(createdb[1:-1:2], createdb[2:-1:2]))
    assert variable == "JETHPO_STORAGE"
    assert createdb[-1] == storage_url.database
    assert (options["-h"], options["-U"]) == (storage_url.host, storage_url.username)
    if (postgres_admin_url.host, postgres_admin_url.port, postgres_admin_url.username) != (
        storage_url.host,
        storage_url.port,
        storage_url.username,
    ):
        pytest.skip(f"the test server {postgres_admin_url.host}:{postgres_admin_url.port} is not the README's")

    # the README's commands, on a database of the test's own
    name = f"jethpo_test_readme_{secrets.token_hex(4)}"
    subprocess.run([*createdb[:-1], name], check=True, timeout=60)
    try:
        env = {**os.environ, variable: storage_url.set(database=name).render_as_string(hide_password=False)}
        # a read-only command reaches the new database and creates nothing in it
        listed = subprocess.run(
            [str(Path(sys.executable).with_name("jethpo")), "spaces", "list"], env=env, capture_output=True, text=True, timeout=120
        )
        studies = subprocess.run(
            [str(Path(sys.executable).with_name("jethpo")), "studies"], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        subprocess.run(["dropdb", *createdb[1:-1], name], check=True, timeout=60)

    assert listed.returncode == 0, listed.stderr
    assert "convae-gen" in listed.stdout
    assert studies.returncode == 1
    assert f"'postgresql://postgres@127.0.0.1:5432/{name}': no jethpo storage found in the database" in studies.stderr
