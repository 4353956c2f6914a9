"""Entry point of ``sweep``: the Typer app, global options and one-line error handling.

Heavy libraries (torch, transformers, ray, sqlalchemy) are imported inside commands so
``sweep --help`` starts fast.
"""

from __future__ import annotations

import os
import sys

import typer

from orchestrator.cli import catalog, compare, db, export, plot, report, results, run, show

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
db.register(app)
show.register(app)
compare.register(app)
plot.register(app)
report.register(app)
export.register(app)


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """Every class called ``name`` among click's, Typer's and Typer's bundled click's.

    Typer ≥ 0.29 raises exceptions of a click copy it bundles (and its own Exit/Abort);
    without catching those, a usage error (missing argument) would surface as a generic
    failure with exit code 1.
    """
    import importlib

    found: list[type[BaseException]] = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _password_out_of_argv(args: list[str]) -> None:
    """Re-run this command with a ``--db`` URL's password moved from argv to the environment.

    A process's command line is world-readable (``ps``), and Ray stores the driver's command
    line as the job's entrypoint, shown on the dashboard's Jobs page. Environment variables
    are readable by the same user only, and the launch removes ``SWEEP_DB_URL`` before Ray
    starts, so workers do not inherit it.
    """
    for i, arg in enumerate(args):
        if arg == "--":
            return
        if arg == "--db" and i + 1 < len(args):
            url, rest = args[i + 1], args[:i] + args[i + 2:]
        elif arg.startswith("--db="):
            url, rest = arg.removeprefix("--db="), args[:i] + args[i + 1:]
        else:
            continue
        try:
            from sqlalchemy.engine import make_url

            has_password = bool(make_url(url).password)
        except Exception:  # noqa: BLE001 - a malformed URL is reported by the command itself
            return
        if has_password:
            env = dict(os.environ, SWEEP_DB_URL=url)
            os.execve(sys.executable, [sys.executable, "-m", "orchestrator.cli.main", *rest], env)
        return


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; domain errors become one line on stderr with exit code 2 (input) or 1."""
    if argv is None:
        _password_out_of_argv(sys.argv[1:])
    abort = _exception_classes("Abort")
    click_error = _exception_classes("ClickException")
    click_exit = _exception_classes("Exit")
    from orchestrator.errors import SweepError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        # Without standalone mode click returns (not raises) the code of a typer.Exit.
        code = command.main(args=args, prog_name="sweep", standalone_mode=False)
    except SweepError as exc:
        if debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click_error as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click_exit as exc:
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
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
