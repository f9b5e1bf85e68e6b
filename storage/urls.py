"""Storage URL resolution, password masking and the storage error type."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

__all__ = [
    "DEFAULT_DATABASE_FILENAME",
    "POSTGRESQL_DRIVER",
    "STORAGE_ENV_VAR",
    "SUPPORTED_DIALECTS",
    "StorageError",
    "StorageNotFoundError",
    "default_storage_url",
    "describe_database_error",
    "mask_password",
    "parse_storage_url",
    "resolve_storage_url",
]

logger = logging.getLogger(__name__)

STORAGE_ENV_VAR = "JETHPO_STORAGE"
"""Environment variable read when no ``--storage`` URL is given."""

DEFAULT_DATABASE_FILENAME = "jethpo.db"
"""SQLite file, under the data directory, used when no storage URL is configured."""

SUPPORTED_DIALECTS = ("postgresql", "sqlite")
"""SQLAlchemy dialects that jethpo opens: PostgreSQL for deployment, SQLite on one machine."""

POSTGRESQL_DRIVER = "postgresql+psycopg2"
"""SQLAlchemy driver for PostgreSQL URLs that name none."""

_MASK = "***"
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


class StorageError(Exception):
    """Storage URL that is invalid or a database that cannot be opened.

    The message is one line that names the URL with its password masked, what failed and
    what to do, so a command line can print ``str(error)`` and exit.
    """


class StorageNotFoundError(StorageError):
    """Storage that a command only reads from, but that no run has created yet."""


def default_storage_url(data_dir: Path, create: bool = True) -> str:
    """Create the data directory and return the URL of the embedded SQLite database in it.

    Args:
        data_dir: Data directory. A relative path is resolved against the working directory.
        create: Whether to create the data directory. Commands that only read a storage
            leave it alone.

    Returns:
        ``sqlite:///<absolute data_dir>/jethpo.db``.
    """
    folder = Path(data_dir).expanduser().resolve()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / DEFAULT_DATABASE_FILENAME).as_posix()}"


def resolve_storage_url(url: str | None, data_dir: Path, create_data_dir: bool = True) -> str:
    """Pick the storage URL: the explicit value, else ``JETHPO_STORAGE``, else SQLite.

    Empty strings count as unset, so ``JETHPO_STORAGE=`` falls back to the default. The URL
    is not validated here; :func:`parse_storage_url` and ``open_storage`` do that.

    Args:
        url: Value of ``--storage``, or ``None`` when the option was not given.
        data_dir: Data directory that contains the default SQLite file. It is created only
            when the default is used and ``create_data_dir`` is set.
        create_data_dir: Whether to create the data directory for the default.

    Returns:
        The storage URL as a string.
    """
    if url:
        logger.debug("Using the storage URL given on the command line: %s", mask_password(url))
        return url

    from_env = os.environ.get(STORAGE_ENV_VAR, "")
    if from_env:
        logger.debug("Using the storage URL from %s: %s", STORAGE_ENV_VAR, mask_password(from_env))
        return from_env

    default = default_storage_url(data_dir, create=create_data_dir)
    logger.debug("Using the embedded SQLite storage %s", default)
    return default


def mask_password(url: str | URL) -> str:
    """Return the URL as text with its password replaced by ``***``.

    A ``password`` query parameter is masked too, because psycopg2 accepts the password
    there. A string that SQLAlchemy cannot parse is masked from the text: everything
    between ``user:`` and the last ``@`` is hidden, and so are ``password=`` values. The
    masked form can over-mask a malformed string but never shows the password.

    Args:
        url: A URL string or a parsed SQLAlchemy URL.

    Returns:
        The URL with its secrets replaced by ``***``.
    """
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = make_url(url)
        except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
            return _mask_unparsed(str(url))

    # SQLAlchemy reads "user:pa@ss@host" as password "pa" and host "ss@host", so a host
    # with "@" may contain the rest of the password
    if parsed.host and "@" in parsed.host:
        raw = url.render_as_string(hide_password=False) if isinstance(url, URL) else str(url)
        return _mask_unparsed(raw)

    rendered = parsed.render_as_string(hide_password=True)
    return _QUERY_PASSWORD.sub(rf"\g<1>{_MASK}", rendered)


def _mask_unparsed(text: str) -> str:
    masked = re.sub(r"(password=)[^&;\s]*", rf"\g<1>{_MASK}", text, flags=re.IGNORECASE)
    if "@" not in masked:
        return masked

    # credentials sit between the scheme and the last "@", so hide all of it
    scheme, separator, rest = masked.partition("://")
    if not separator:
        scheme, rest = "", masked
    user_info, _, host_part = rest.rpartition("@")
    user = user_info.split(":", 1)[0]
    credentials = f"{user}:{_MASK}" if ":" in user_info else _MASK
    prefix = f"{scheme}://" if separator else ""
    return f"{prefix}{credentials}@{host_part}"


def parse_storage_url(url: str) -> URL:
    """Parse a storage URL, check its dialect and driver, and pin the PostgreSQL driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` URL to psycopg 3, but jethpo installs
    psycopg2, so a URL without a driver gets ``postgresql+psycopg2://``. Pass the result
    (``render_as_string(hide_password=False)``) to any other tool that opens the
    database, such as optuna-dashboard.

    Args:
        url: Storage URL, e.g. ``postgresql://user:password@host:5432/jethpo`` or
            ``sqlite:////data/jethpo.db``.

    Returns:
        The parsed SQLAlchemy URL, with the PostgreSQL driver filled in.

    Raises:
        StorageError: The URL cannot be parsed, its dialect is not PostgreSQL or SQLite,
            a PostgreSQL URL names no database, or SQLAlchemy has no such driver for the
            dialect.
    """
    masked = mask_password(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        raise StorageError(
            f"Invalid storage URL {masked!r}: it is not a database URL. Pass a URL such as "
            f"postgresql://user:password@host:5432/jethpo or sqlite:////path/to/jethpo.db "
            f"with --storage or {STORAGE_ENV_VAR}."
        ) from None

    dialect = parsed.get_backend_name()
    if dialect not in SUPPORTED_DIALECTS:
        raise StorageError(
            f"Unsupported storage URL {masked!r}: dialect {dialect!r} is not one of "
            f"{', '.join(SUPPORTED_DIALECTS)}. Pass a postgresql:// or sqlite:// URL with "
            f"--storage or {STORAGE_ENV_VAR}."
        )
    if dialect == "postgresql" and not parsed.database and "dbname" not in parsed.query:
        # libpq would open the database named after the user, for user postgres the server's own
        raise StorageError(
            f"Invalid storage URL {masked!r}: it names no database. Add the database name after "
            f"the port, as in postgresql://user:password@host:5432/jethpo, with --storage or {STORAGE_ENV_VAR}."
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername=POSTGRESQL_DRIVER)

    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(
            f"Unsupported storage URL {masked!r}: SQLAlchemy has no driver "
            f"{parsed.get_driver_name()!r} for {dialect}. Leave the driver out "
            f"(postgresql://... or sqlite://...) or pass {POSTGRESQL_DRIVER} for PostgreSQL."
        ) from None
    return parsed


def describe_database_error(error: BaseException, password: str | None = None) -> str:
    """Return the first line of a database driver's error message, without the password.

    Args:
        error: Exception raised by SQLAlchemy or the driver. For SQLAlchemy's wrapped
            errors the driver's original message is used, which leaves out the SQL
            statement and the link to SQLAlchemy's error guide.
        password: Password to remove from the text in case the driver echoes it.

    Returns:
        One line of text, whitespace collapsed.
    """
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else type(original).__name__
    if password:
        text = text.replace(password, _MASK)
    return text
