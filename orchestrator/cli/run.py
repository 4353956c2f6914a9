"""``sweep launch`` and ``sweep validate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from orchestrator.cli.render import Format, make_console, render


def register(app: typer.Typer) -> None:
    """Add the commands of this group to ``app``."""
    app.command()(launch)
    app.command()(validate)


def _trial_rows(trials: list) -> list[dict]:
    return [{"#": t.position, "model": t.model, "method": t.method, "rate": t.rate,
             "dataset": t.dataset, "trial_key": t.trial_key[:12]} for t in trials]


def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec (YAML)."),
    skip_sources: bool = typer.Option(False, "--skip-sources",
                                      help="Do not check that models and datasets exist."),
) -> None:
    """Check a spec and report every problem at once (exit code 2 when there are any)."""
    from orchestrator import spec as spec_module

    spec = spec_module.load(spec_path, check_sources=not skip_sources)
    trials = spec_module.expand(spec)
    baselines = sum(t.is_baseline for t in trials)
    print(f"{spec_path}: ok — sweep {spec.name!r}, {len(trials)} trials "
          f"({baselines} baseline, {len(trials) - baselines} compressed)")


def launch(
    ctx: typer.Context,
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec (YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print the trial table; change nothing, start nothing."),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1,
                                       help="Trials at once (overrides the spec)."),
    address: str = typer.Option(None, "--address",
                                help="Existing Ray cluster: auto or ray://HOST:10001."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed trials again."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard",
                                   help="Start the Ray dashboard with a local Ray."),
    storage_path: str = typer.Option(
        None, "--storage-path", metavar="DIR|URI",
        help="Directory for Tune state and workers' result files (default: the cache); on a "
             "cluster, a shared filesystem mounted at the same path on every node, or an "
             "object store URI such as s3://bucket/dir."),
    fmt: Format = typer.Option(Format.table, "--format", help="Format of the final leaderboard."),
) -> None:
    """Run a sweep: every trial not already done in the database runs on Ray Tune."""
    from orchestrator import launch as service
    from orchestrator import spec as spec_module
    from orchestrator.db.engine import redact_url

    db_url = ctx.obj["db"]
    if storage_path is not None:
        storage_path = _storage_directory(storage_path)
    # Ray's processes inherit this process's environment; the URL may carry a password.
    os.environ.pop("SWEEP_DB_URL", None)
    spec = spec_module.load(spec_path)
    console = make_console(stderr=True)
    for model in spec.models:
        if model.trust_remote_code:
            console.print(f"[yellow]warning[/]: {model.id} has trust_remote_code: true — code "
                          "from the model's repository will run in every trial process")
    if dry_run:
        planned = service.plan(spec, str(spec_path), db_url, dry_run=True)
        text = render(_trial_rows(planned.trials), ["#", "model", "method", "rate", "dataset",
                                                    "trial_key"], fmt,
                      title=f"sweep {spec.name}: {len(planned.trials)} trials (dry run)")
        if text is not None:
            print(text)
        return
    if address is None:
        service.check_local_resources(spec)
    service.check_address(address, db_url, storage_path)
    planned = service.plan(spec, str(spec_path), db_url, retry_failed=retry_failed,
                           storage_path=storage_path)
    skipped = len(planned.trials) - len(planned.to_run) - len(planned.busy)
    console.print(f"sweep [bold]{spec.name}[/]: {len(planned.trials)} trials, "
                  f"{skipped} already recorded, {len(planned.to_run)} to run "
                  f"(results: {redact_url(db_url)})")
    if planned.reset:
        console.print(f"{planned.reset} trial(s) left running by a launch that died will run "
                      "again")
    if planned.recovered:
        console.print(f"recovered {planned.recovered} result(s) that workers of a launch that "
                      "died had written")
    if planned.busy:
        owners = ", ".join(sorted(set(planned.busy.values())))
        console.print(f"{len(planned.busy)} trial(s) are being run by another launch ({owners}):"
                      " left to it")
    if not planned.to_run:
        failed = sum(1 for s in planned.statuses.values() if s in ("failed", "timed_out"))
        note = f" ({failed} failed or timed out: rerun them with --retry-failed)" if failed else ""
        what = "every trial is done or being run elsewhere" if planned.busy else \
            "every trial is already done"
        console.print(f"nothing to run: {what}{note}")
    else:
        outcome = _run_with_progress(service, planned, db_url, console, max_concurrent, address,
                                     dashboard, storage_path)
        retried = f" ({outcome.retried} retries)" if outcome.retried else ""
        console.print(f"ran {outcome.ran} trials in {outcome.seconds:.0f} s{retried}: "
                      f"{outcome.done} done, {outcome.failed} failed or timed out")
        console.print(f"sweep {spec.name}: {_costs_line(db_url, spec.name)}", highlight=False,
                      soft_wrap=True)
    from orchestrator.cli.results import print_leaderboard

    print_leaderboard(db_url, metric="score", sweep=spec.name, fmt=fmt, top=None,
                      include_failed=False)
    if not planned.to_run:
        return
    if outcome.failed:
        console.print(f"[red]{outcome.failed} trial(s) failed[/]: see `sweep status --sweep "
                      f"{spec.name}`")
        sys.exit(1)


def _costs_line(db_url: str, sweep: str) -> str:
    from orchestrator import queries
    from orchestrator.db.engine import ensure_schema, session_scope
    from orchestrator.report import describe_costs

    with session_scope(ensure_schema(db_url, create=False)) as session:
        return describe_costs(queries.sweep_costs(session, sweep))


def _storage_directory(value: str) -> str:
    """``--storage-path`` as an absolute directory (workers on other nodes get it verbatim),
    or a URI pyarrow can open (``s3://bucket/dir``)."""
    from orchestrator.errors import BadInput

    if "://" in value:
        from orchestrator.launch import check_storage_uri

        check_storage_uri(value)
        return value
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise BadInput(f"--storage-path {value} is a file; give a directory")
    return str(path)


def watch_hint(sweep: str, db_url: str) -> str:
    """The ``sweep status --watch`` command that follows this sweep from another terminal.

    A URL with a password is not printed with it: the command then reads the database from
    ``SWEEP_DB_URL``, which the other terminal sets (the hint shows the URL, password hidden).
    """
    import shlex

    from sqlalchemy.engine import make_url

    from orchestrator.db.engine import DEFAULT_URL, redact_url

    watch = ["status", "--sweep", sweep, "--watch"]
    if db_url == DEFAULT_URL:
        return shlex.join(["sweep", *watch])
    if make_url(db_url).password:
        return (shlex.join(["sweep", *watch])
                + f"  (with SWEEP_DB_URL={redact_url(db_url)} set, password filled in)")
    return shlex.join(["sweep", "--db", db_url, *watch])


def _run_with_progress(service, planned, db_url, console, max_concurrent, address, dashboard,
                       storage_path=None):
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("done {task.fields[done]} · running {task.fields[running]} · "
                              "failed {task.fields[failed]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, transient=False)
    watch_command = watch_hint(planned.spec.name, db_url)
    task = bar.add_task(planned.spec.name, total=len(planned.to_run), done=0, running=0, failed=0)

    def on_start(url: str | None, placement: str) -> None:
        console.print(f"running {placement}", highlight=False, soft_wrap=True)
        if url:
            console.print(f"Ray dashboard: [link={url}]{url}[/link]")
        console.print(f"follow it from another terminal: {escape(watch_command)}",
                      highlight=False, soft_wrap=True)
        bar.start()

    def on_change(progress) -> None:
        bar.update(task, completed=progress.done + progress.failed, done=progress.done,
                   running=progress.running, failed=progress.failed)

    try:
        return service.run(planned, db_url, max_concurrent=max_concurrent, address=address,
                           include_dashboard=dashboard, on_start=on_start, on_change=on_change,
                           storage_path=storage_path,
                           on_warning=lambda message: console.print(
                               f"[yellow]warning[/]: {escape(message)}", soft_wrap=True,
                               highlight=False))
    finally:
        bar.stop()
