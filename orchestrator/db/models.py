"""SQLAlchemy 2.0 typed ORM models of the results database (the one place tables are defined).

Migrations in ``migrations/versions`` must produce exactly this schema; a test compares them
with Alembic's autogenerate, so a change here without a revision fails the suite.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Explicit names so Alembic batch migrations on SQLite and plain ALTERs on PostgreSQL refer
# to the same constraint; without a convention PostgreSQL invents names and SQLite has none.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TRIAL_STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed", "timed_out")
# Why a trial did not finish. Deterministic reasons are never retried automatically: the
# same variant would fail the same way.
FAILURE_REASONS: tuple[str, ...] = (
    "error", "worker_crashed", "out_of_memory", "timed_out", "no_effect", "invalid_evaluation",
)
DETERMINISTIC_FAILURES: tuple[str, ...] = ("no_effect", "invalid_evaluation")
DIRECTIONS: tuple[str, ...] = ("higher", "lower")


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time-zone type and hands back naive datetimes; this normalises values to
    UTC on the way in and re-attaches UTC on the way out, so callers never compare naive
    with aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; results store only aware UTC times")
        value = value.astimezone(UTC)
        # SQLite would store the offset as text and then fail to compare it with naive
        # values written by other tools; store naive UTC there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _sql_in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata and its naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Sweep(Base):
    """One named sweep: the validated spec it was launched from and its trials."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]]
    spec_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    trials: Mapped[list[Trial]] = relationship(
        back_populates="sweep",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Trial.position",
    )

    def __repr__(self) -> str:
        return f"Sweep(id={self.id!r}, name={self.name!r})"


class Driver(Base):
    """One ``sweep launch`` process and its lease on the trials it claimed.

    A live driver refreshes ``heartbeat_at``; a driver whose heartbeat is older than the
    lease, whose process is gone (same host), or that finished, holds nothing: its
    ``running`` trials are reset and run again by the next launch.
    """

    __tablename__ = "drivers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"Driver(id={self.id!r}, host={self.host!r}, pid={self.pid!r})"


class Environment(Base):
    """Where a trial ran: hardware, package versions and git commit, deduplicated."""

    __tablename__ = "environments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # sha256 over hardware + packages + git sha: identical environments share one row.
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    # sha256 over hardware alone: speed numbers are comparable only within one value.
    hardware_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    hardware: Mapped[dict[str, Any]]
    packages: Mapped[dict[str, Any]]
    git_sha: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    trials: Mapped[list[Trial]] = relationship(back_populates="environment")

    def __repr__(self) -> str:
        return f"Environment(id={self.id!r}, fingerprint={self.fingerprint[:12]!r})"


class Trial(Base):
    """One point of a sweep's grid (or the baseline of a model × dataset)."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("sweep_id", "trial_key"),
        CheckConstraint(f"status IN ({_sql_in(TRIAL_STATUSES)})", name="status"),
        # `sweep status` and the driver's resume filter one sweep by status (the first two
        # columns). The leaderboard finds the baselines and joins each one to the finished
        # trials of its sweep, model and dataset from this index alone: the other columns are
        # what it reads (id too: PostgreSQL's index-only scans need every column returned).
        Index(
            "ix_trials_sweep_id_status_model_dataset", "sweep_id", "status", "model", "dataset",
            "is_baseline", "environment_id", "position", "id",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    trial_key: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(100))
    rate: Mapped[float | None] = mapped_column(Float)
    dataset: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    host: Mapped[str | None] = mapped_column(String(255))
    # The GPU ids Ray gave the trial's worker ("0", "2,3"; "" on CPU), as the worker
    # announced them when it began; NULL until then (and for trials stored before 0003).
    gpus: Mapped[str | None] = mapped_column(String(64))
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(String(32))
    # The launch that claimed this trial; a trial claimed by a live driver is not run twice.
    driver_id: Mapped[int | None] = mapped_column(
        ForeignKey("drivers.id", ondelete="SET NULL"), index=True
    )
    environment_id: Mapped[int | None] = mapped_column(
        ForeignKey("environments.id", ondelete="SET NULL"), index=True
    )

    sweep: Mapped[Sweep] = relationship(back_populates="trials")
    environment: Mapped[Environment | None] = relationship(back_populates="trials")
    metrics: Mapped[list[Metric]] = relationship(
        back_populates="trial",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Metric.name",
    )
    evidence: Mapped[Evidence | None] = relationship(
        back_populates="trial",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    def __repr__(self) -> str:
        return (
            f"Trial(id={self.id!r}, key={self.trial_key[:12]!r}, model={self.model!r}, "
            f"method={self.method!r}, rate={self.rate!r}, status={self.status!r})"
        )


class Metric(Base):
    """One named measurement of a trial, with the direction in which it is better.

    Non-finite values (NaN, ±inf) are stored as NULL with ``note`` saying what they were:
    PostgreSQL's JSON and SQLite's REAL disagree about NaN, and a NULL sorts predictably.
    """

    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("trial_id", "name"),
        CheckConstraint(f"direction IN ({_sql_in(DIRECTIONS)})", name="direction"),
        # The leaderboard: the best values of a metric in order (a top-N stops early), all
        # values of the score's metrics in one pass, and a metric's stored directions, each
        # read from this index alone.
        Index("ix_metrics_name_value", "name", "value", "trial_id", "direction"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    direction: Mapped[str | None] = mapped_column(String(8))
    note: Mapped[str | None] = mapped_column(String(200))

    trial: Mapped[Trial] = relationship(back_populates="metrics")

    def __repr__(self) -> str:
        return f"Metric(trial_id={self.trial_id!r}, name={self.name!r}, value={self.value!r})"


class Evidence(Base):
    """Proof that the compression took effect (one row per trial)."""

    __tablename__ = "evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), unique=True
    )
    # Parameter counts of large models exceed 2**31.
    params_before: Mapped[int | None] = mapped_column(BigInteger)
    params_after: Mapped[int | None] = mapped_column(BigInteger)
    changed_fraction: Mapped[float | None] = mapped_column(Float)
    max_abs_dlogits: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]]

    trial: Mapped[Trial] = relationship(back_populates="evidence")

    def __repr__(self) -> str:
        return f"Evidence(trial_id={self.trial_id!r})"
