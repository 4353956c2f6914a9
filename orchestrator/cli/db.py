"""``sweep db upgrade | current | downgrade REV``: the schema migrations of the results database.

Read and write commands refuse a database at an older schema revision; these commands are
the explicit way to move it. The URL is shown with its password redacted everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer

from orchestrator.errors import BadInput, SweepError

T = TypeVar("T")

db_app = typer.Typer(name="db", no_args_is_help=True,
                     help="Create, upgrade, inspect or downgrade the database schema.")


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to ``app``."""
    app.add_typer(db_app, name="db")


def _scrub(text: str, db_url: str) -> str:
    # Drivers quote the connection target in their messages; never let a password through.
    from sqlalchemy.engine import make_url

    password = make_url(db_url).password
    return text.replace(str(password), "***") if password else text


@contextmanager
def _database_errors(db_url: str) -> Iterator[None]:
    """Turn driver and Alembic failures into one-line :class:`SweepError` messages."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DBAPIError

    from orchestrator.db.engine import redact_url

    shown = redact_url(db_url)
    try:
        yield
    except DBAPIError as exc:
        detail = str(exc.orig).strip()
        reason = detail.splitlines()[0] if detail else type(exc.orig).__name__
        raise SweepError(
            f"cannot open the results database at {shown}: {_scrub(reason, db_url)}"
        ) from exc
    except CommandError as exc:
        # Unknown revision or one on the wrong side of the current one: the user's input.
        reason = " ".join(str(exc).split())
        raise BadInput(f"{_scrub(reason, db_url)} (database {shown})") from exc


def _revision(db_url: str) -> str | None:
    from orchestrator.db.engine import current_revision, sqlite_path

    path = sqlite_path(db_url)
    if path is not None and not path.exists():
        # Opening would create the file; a read must not.
        return None
    return current_revision(db_url)


def _label(revision: str | None) -> str:
    return revision if revision is not None else "base (no schema)"


def _migrate(db_url: str, action: Callable[[], T]) -> tuple[str | None, str | None]:
    with _database_errors(db_url):
        before = _revision(db_url)
        action()
        return before, _revision(db_url)


def _report(db_url: str, before: str | None, after: str | None) -> None:
    from orchestrator.db.engine import redact_url

    print(f"database: {redact_url(db_url)}")
    print(f"revision: {_label(before)} -> {_label(after)}"
          + (" (unchanged)" if before == after else ""))


@db_app.command()
def upgrade(
    ctx: typer.Context,
    revision: str = typer.Option("head", "--revision", help="Target revision."),
) -> None:
    """Create the schema or migrate it up to REVISION (default: the newest)."""
    from orchestrator.db import engine

    db_url: str = ctx.obj["db"]
    _report(db_url, *_migrate(db_url, lambda: engine.upgrade(db_url, revision)))


@db_app.command()
def current(ctx: typer.Context) -> None:
    """Print the schema revision of the database and whether it is the newest."""
    from orchestrator.db import engine

    db_url: str = ctx.obj["db"]
    with _database_errors(db_url):
        revision = _revision(db_url)
    head = engine.head_revision()
    print(f"database: {engine.redact_url(db_url)}")
    if revision == head:
        print(f"revision: {revision} (head)")
    else:
        print(f"revision: {_label(revision)} (not at head {head}; run `sweep db upgrade`)")


@db_app.command()
def downgrade(
    ctx: typer.Context,
    revision: str = typer.Argument(..., metavar="REV",
                                   help="Target revision; `base` drops every table."),
) -> None:
    """Migrate the schema down to REV ("base" removes it and all results)."""
    from orchestrator.db import engine

    db_url: str = ctx.obj["db"]
    _report(db_url, *_migrate(db_url, lambda: engine.downgrade(db_url, revision)))
