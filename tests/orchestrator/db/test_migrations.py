"""Alembic migrations agree with the ORM models and move data safely (migrations/)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, func, inspect, select

from orchestrator.db import engine as engine_module
from orchestrator.db.engine import (
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    make_engine,
    redact_url,
    session_scope,
    upgrade,
)
from orchestrator.db.models import Base, Evidence, Metric, Trial
from orchestrator.db.store import record_result, register_sweep
from orchestrator.errors import SchemaOutOfDate

TABLES = {"sweeps", "environments", "drivers", "trials", "metrics", "evidence"}
HEAD = "0003_trial_gpus"

SECOND_REVISION = '''"""Test-only revision 0004: rebuilds `trials` with a new column."""

import sqlalchemy as sa
from alembic import op

revision = "0004_test"
down_revision = "0003_trial_gpus"
branch_labels = None
depends_on = None


def _recreate() -> str:
    # Force SQLite's copy-and-move (the risky path); PostgreSQL alters in place.
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"


def upgrade() -> None:
    with op.batch_alter_table("trials", recreate=_recreate()) as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trials", recreate=_recreate()) as batch:
        batch.drop_column("note")
'''


def _diff(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_head_creates_every_table(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    assert _tables(engine) == TABLES | {"alembic_version"}
    assert current_revision(db_url) == head_revision() == HEAD


def test_migrated_schema_equals_the_models(db_url: str) -> None:
    upgrade(db_url)
    assert _diff(make_engine(db_url), Base.metadata) == []


def test_the_comparison_would_see_a_difference(db_url: str) -> None:
    """Guards the test above: a model change without a migration must show up."""
    upgrade(db_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["trials"].append_column(sa.Column("note", sa.Text()))
    changed.tables["metrics"].c.name.type = sa.String(length=50)
    diff = _diff(make_engine(db_url), changed)
    kinds = {entry[0] if isinstance(entry, tuple) else entry[0][0] for entry in diff}
    assert kinds == {"add_column", "modify_type"}


def _index_names(inspector: Any, table: str) -> set[str]:
    # PostgreSQL also lists the index behind each unique constraint; those are not ours.
    return {
        i["name"] for i in inspector.get_indexes(table) if not i.get("duplicates_constraint")
    }


def test_constraint_names_follow_the_naming_convention(db_url: str) -> None:
    upgrade(db_url)
    inspector = inspect(make_engine(db_url))
    assert {u["name"] for u in inspector.get_unique_constraints("trials")} == {
        "uq_trials_sweep_id_trial_key"}
    assert {f["name"] for f in inspector.get_foreign_keys("trials")} == {
        "fk_trials_sweep_id_sweeps", "fk_trials_environment_id_environments",
        "fk_trials_driver_id_drivers"}
    assert {c["name"] for c in inspector.get_check_constraints("trials")} == {"ck_trials_status"}
    assert _index_names(inspector, "trials") == {
        "ix_trials_sweep_id_status_model_dataset", "ix_trials_environment_id",
        "ix_trials_driver_id"}
    assert {u["name"] for u in inspector.get_unique_constraints("metrics")} == {
        "uq_metrics_trial_id_name"}
    assert _index_names(inspector, "metrics") == {"ix_metrics_name_value"}
    assert _index_names(inspector, "environments") == {"ix_environments_hardware_fingerprint"}


def test_downgrade_base_then_upgrade_head_round_trips(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    downgrade(db_url, "base")
    assert _tables(engine) <= {"alembic_version"}
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert _tables(engine) == TABLES | {"alembic_version"}
    assert _diff(engine, Base.metadata) == []
    with session_scope(engine, write=True) as session:
        register_sweep(session, "again", {}, None, [])  # the schema works after the trip


def test_ensure_schema_treats_a_downgraded_database_as_empty(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    ensure_schema(db_url, create=True)
    assert current_revision(db_url) == head_revision()


@pytest.fixture
def newer_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The migrations as a future release would ship them: one revision past the head."""
    location = tmp_path / "future_migrations"
    shutil.copytree(engine_module.script_location(), location,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "0004_test.py").write_text(SECOND_REVISION)
    monkeypatch.setattr(engine_module, "script_location", lambda: str(location))
    return location


def test_older_schema_is_refused_with_the_upgrade_command(
    db_url: str, newer_code: Path
) -> None:
    upgrade(db_url, HEAD)  # a database written by the previous release
    with pytest.raises(SchemaOutOfDate) as caught:
        ensure_schema(db_url, create=True)
    message = str(caught.value)
    assert "sweep db upgrade" in message
    assert redact_url(db_url) in message
    assert f"'{HEAD}'" in message and "'0004_test'" in message
    assert caught.value.exit_code == 1
    assert current_revision(db_url) == HEAD  # refused, not migrated behind our back


def test_upgrade_moves_data_through_a_table_rebuild(
    db_url: str, newer_code: Path, make_result: Callable[..., dict[str, Any]],
    trial_rows: Callable[..., list[dict[str, Any]]],
) -> None:
    upgrade(db_url, HEAD)
    engine = make_engine(db_url)
    rows = trial_rows(2)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", {}, None, rows)
        for row in rows:
            record_result(session, "s1", row["trial_key"], make_result())

    # Rebuilding `trials` drops the old table; with foreign keys on, that DROP would
    # cascade into metrics and evidence.
    upgrade(db_url)
    assert current_revision(db_url) == "0004_test"
    assert ensure_schema(db_url, create=False) is engine
    assert "note" in {c["name"] for c in inspect(engine).get_columns("trials")}
    with session_scope(engine) as session:
        counts = [session.scalar(select(func.count()).select_from(m))
                  for m in (Trial, Metric, Evidence)]
    assert counts == [3, 3, 3]
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # the pooled migration connection got its pragma back
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1

    downgrade(db_url, HEAD)
    assert _diff(engine, Base.metadata) == []
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Metric)) == 3


# --------------------------------------------------------------------------- 0002


def _fill_first_revision(engine: Engine) -> None:
    """Rows as the first release wrote them (its tables, reflected: the ORM is newer)."""
    meta = MetaData()
    meta.reflect(engine)
    sweeps, trials, metrics, evidence, environments = (
        meta.tables[name] for name in ("sweeps", "trials", "metrics", "evidence", "environments"))
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(sweeps.insert(), [{"id": 1, "name": "old", "spec": {"name": "old"},
                                        "spec_path": None, "created_at": now,
                                        "updated_at": now}])
        conn.execute(environments.insert(), [{
            "id": 1, "fingerprint": "f" * 64, "hardware_fingerprint": "h" * 64,
            "hardware": {"cpu": "x"}, "packages": {}, "git_sha": None, "created_at": now}])
        common = {"sweep_id": 1, "model": "m", "dataset": "d", "params": {}, "config": {},
                  "attempts": 1, "created_at": now, "environment_id": 1,
                  # executemany takes its columns from the first row: name them all.
                  "error_type": None, "error_message": None}
        conn.execute(trials.insert(), [
            {**common, "id": 1, "trial_key": "a" * 64, "position": 0, "method": "none",
             "rate": None, "is_baseline": True, "status": "done"},
            {**common, "id": 2, "trial_key": "b" * 64, "position": 1, "method": "drop_layers",
             "rate": 0.5, "is_baseline": False, "status": "failed",
             "error_type": "WorkerCrashed", "error_message": "died"},
            {**common, "id": 3, "trial_key": "c" * 64, "position": 2, "method": "drop_layers",
             "rate": 0.25, "is_baseline": False, "status": "failed",
             "error_type": "ValueError", "error_message": "bad"},
        ])
        conn.execute(metrics.insert(), [
            {"trial_id": 1, "name": "perplexity", "value": 12.5, "direction": "lower"},
            {"trial_id": 1, "name": "params", "value": 1e6, "direction": "lower"}])
        conn.execute(evidence.insert(), [{
            "trial_id": 1, "params_before": 10, "params_after": 10, "changed_fraction": 0.0,
            "max_abs_dlogits": 0.0, "details": {"method": {}}}])


def test_first_release_database_upgrades_with_every_row_intact(db_url: str) -> None:
    upgrade(db_url, "0001_initial")
    engine = make_engine(db_url)
    _fill_first_revision(engine)
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    assert _diff(engine, Base.metadata) == []
    with session_scope(engine) as session:
        trials = {t.trial_key[0]: t for t in session.scalars(select(Trial))}
        assert {k: (t.status, t.failure_reason, t.driver_id) for k, t in trials.items()} == {
            "a": ("done", None, None), "b": ("failed", "worker_crashed", None),
            "c": ("failed", "error", None)}
        assert {m.name: m.value for m in trials["a"].metrics} == {"perplexity": 12.5,
                                                                  "params": 1e6}
        assert trials["a"].evidence is not None and trials["a"].evidence.params_after == 10
        assert trials["a"].environment is not None
    # The widened status constraint accepts the new status and still refuses others.
    with session_scope(engine, write=True) as session:
        session.execute(sa.update(Trial).where(Trial.id == 3).values(status="timed_out"))
    with pytest.raises(sa.exc.IntegrityError), session_scope(engine, write=True) as session:
        session.execute(sa.update(Trial).where(Trial.id == 3).values(status="lost"))


def test_downgrade_to_first_release_keeps_rows_and_maps_timed_out(db_url: str) -> None:
    upgrade(db_url, "0001_initial")
    engine = make_engine(db_url)
    _fill_first_revision(engine)
    upgrade(db_url)
    with session_scope(engine, write=True) as session:
        session.execute(sa.update(Trial).where(Trial.id == 3).values(status="timed_out",
                                                                     failure_reason="timed_out"))
    downgrade(db_url, "0001_initial")
    assert "drivers" not in _tables(engine)
    inspector = inspect(engine)
    assert _index_names(inspector, "trials") == {
        "ix_trials_sweep_id_status", "ix_trials_environment_id"}
    assert _index_names(inspector, "metrics") == set()
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, status FROM trials")).all())
        assert rows == {1: "done", 2: "failed", 3: "failed"}
        assert conn.execute(sa.text("SELECT count(*) FROM metrics")).scalar() == 2
    upgrade(db_url)
    assert _diff(engine, Base.metadata) == []


# --------------------------------------------------------------------------- 0003


def test_trial_gpus_column_comes_and_goes_with_every_row_intact(db_url: str) -> None:
    upgrade(db_url, "0002_leases_timeouts")
    engine = make_engine(db_url)
    meta = MetaData()
    meta.reflect(engine)
    assert "gpus" not in meta.tables["trials"].c
    _fill_first_revision(engine)  # rows as an older release wrote them
    upgrade(db_url, "0003_trial_gpus")
    assert _diff(engine, Base.metadata) == []
    with session_scope(engine, write=True) as session:
        assert session.scalars(select(Trial.gpus)).all() == [None, None, None]
        session.execute(sa.update(Trial).where(Trial.id == 1).values(gpus="0,1"))
    downgrade(db_url, "0002_leases_timeouts")
    assert "gpus" not in {c["name"] for c in inspect(engine).get_columns("trials")}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trials")).scalar() == 3
        assert conn.execute(sa.text("SELECT count(*) FROM metrics")).scalar() == 2
        assert conn.execute(sa.text("SELECT count(*) FROM evidence")).scalar() == 1
    upgrade(db_url)
    assert _diff(engine, Base.metadata) == []
