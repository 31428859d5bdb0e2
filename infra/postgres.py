"""The stack's PostgreSQL databases: one per service, created when missing, dropped by the tests."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from infra.processes import StackError


def database_url(postgres_url: str, database: str, driver: str = "") -> str:
    """Returns `postgres_url` pointing at `database` (with `+driver` in the scheme when given)."""
    parts = urlsplit(postgres_url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise StackError(f"postgres url {postgres_url!r}: expected postgresql://user@host:port")
    scheme = "postgresql" + (f"+{driver}" if driver else "")
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


def ensure_database(postgres_url: str, database: str) -> None:
    """Creates `database` on the PostgreSQL server when it does not exist."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = psycopg2.connect(database_url(postgres_url, "postgres"), connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise StackError(f"PostgreSQL at {postgres_url}: cannot connect ({str(exc).strip()})") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        conn.close()


def drop_database(postgres_url: str, database: str) -> None:
    """Drops `database` (used by the tests to clean up after themselves)."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(database_url(postgres_url, "postgres"), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    finally:
        conn.close()
