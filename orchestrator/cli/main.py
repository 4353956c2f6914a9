"""Entry point of ``sweep``: the Typer app, global options and one-line error handling.

Heavy libraries (torch, transformers, ray, sqlalchemy) are imported inside commands so
``sweep --help`` starts fast.
"""

from __future__ import annotations

import sys

import typer

from orchestrator.cli import catalog, results, run

app = typer.Typer(
    name="sweep", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Sweep model-compression methods over models, rates and datasets on Ray; "
         "results land in a database.",
)


@app.callback()
def root(
    ctx: typer.Context,
    db: str = typer.Option(None, "--db", envvar="SWEEP_DB_URL", show_envvar=True,
                           help="Results database URL (default: sqlite:///sweeps.db)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Global options."""
    ctx.obj = {"db": db or "sqlite:///sweeps.db", "debug": debug}


run.register(app)
results.register(app)
catalog.register(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; domain errors become one line on stderr with exit code 2 (input) or 1."""
    import click

    from orchestrator.errors import SweepError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="sweep", standalone_mode=False)
    except SweepError as exc:
        if debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
