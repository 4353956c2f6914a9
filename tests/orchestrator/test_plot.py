"""`sweep plot` (orchestrator/plots.py, orchestrator/cli/plot.py): Pareto fronts, and the
images themselves, rendered from results in a real SQLite database."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageStat
from sqlalchemy import Engine

from orchestrator.db.engine import dispose_engines, ensure_schema, session_scope
from orchestrator.db.store import mark_running, record_result, register_sweep
from orchestrator.errors import BadInput
from orchestrator.plots import (
    METRIC_VS_RATE,
    QUALITY_VS_SPEED,
    PlotFile,
    pareto_front,
    plot_sweep,
    series_id,
)

HW_A = {"cpu": "x86_64", "gpus": []}
HW_B = {"cpu": "aarch64", "gpus": ["H100"]}
SPEC = {"name": "s", "score": {"quality_metric": "perplexity", "weight": 0.5}}
MODEL, DATASET = "builtin:tiny-llama", "builtin:pydoc"
STEM = "s__builtin_tiny-llama__builtin_pydoc"

# --------------------------------------------------------------------------- Pareto front


def _dominates(a: tuple[float, float], b: tuple[float, float], maximize: tuple[bool, bool]
               ) -> bool:
    better_or_equal = all((x >= y) if up else (x <= y) for x, y, up in zip(a, b, maximize,
                                                                            strict=True))
    return better_or_equal and a != b


def _brute_force(points: list[tuple[float, float]], maximize: tuple[bool, bool]) -> list[int]:
    return [i for i, p in enumerate(points)
            if not any(_dominates(q, p, maximize) for q in points)]


def test_front_of_a_constructed_case_minimizing_both() -> None:
    points = [(2.0, 60.0), (1.9, 70.0), (1.5, 75.0), (1.2, 106.0), (2.05, 62.0),
              (2.05, 70.0), (2.0, 95.0)]
    assert pareto_front(points) == [0, 1, 2, 3]


def test_front_follows_each_direction() -> None:
    points = [(1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (2.0, 1.0)]
    assert pareto_front(points, maximize=(False, False)) == [0]
    assert pareto_front(points, maximize=(True, True)) == [1]
    assert pareto_front(points, maximize=(False, True)) == [2]
    assert pareto_front(points, maximize=(True, False)) == [3]


def test_duplicates_on_the_front_are_all_kept_and_ties_dominated() -> None:
    # (1, 5) twice: neither beats the other. (1, 6) ties on x and is worse on y; (3, 5) ties
    # on y and is worse on x; (2, 3) and (4, 1) trade off with the rest.
    points = [(1.0, 5.0), (1.0, 6.0), (1.0, 5.0), (3.0, 5.0), (2.0, 3.0), (4.0, 1.0),
              (4.0, 1.0)]
    assert pareto_front(points) == [0, 2, 4, 5, 6]


def test_front_of_nothing_and_of_one_point() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(3.0, -1.0)], maximize=(True, False)) == [0]


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1.0, float("nan"))])


# Few distinct values so that ties and duplicates are common.
_coordinate = st.one_of(st.integers(-3, 3).map(float),
                        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@settings(max_examples=300, deadline=None)
@given(points=st.lists(st.tuples(_coordinate, _coordinate), max_size=30),
       maximize=st.tuples(st.booleans(), st.booleans()))
def test_front_matches_brute_force(points: list[tuple[float, float]],
                                   maximize: tuple[bool, bool]) -> None:
    assert pareto_front(points, maximize) == _brute_force(points, maximize)


# --------------------------------------------------------------------------- results


def _row(key: str, position: int, method: str, rate: float | None,
         params: dict[str, Any] | None = None, model: str = MODEL, dataset: str = DATASET
         ) -> dict[str, Any]:
    return {"trial_key": key, "position": position, "model": model, "method": method,
            "rate": rate, "dataset": dataset, "params": params or {},
            "config": {"trial_key": key}, "is_baseline": method == "none"}


def _result(ppl: float | None, tpt: float | None, hardware: dict[str, Any] = HW_A,
            status: str = "done", error: dict[str, str] | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if ppl is not None:
        metrics["perplexity"] = {"value": ppl, "direction": "lower"}
    if tpt is not None:
        metrics["decode_ms_per_token"] = {"value": tpt, "direction": "lower"}
        metrics["decode_tokens_per_s"] = {"value": 1000.0 / tpt, "direction": "higher"}
    result: dict[str, Any] = {
        "status": status, "metrics": metrics,
        "environment": {"hardware": hardware, "packages": {"torch": "2.13.0"}, "git_sha": "abc"},
        "host": "node-1", "duration_s": 1.0,
    }
    if error is not None:
        result["error"] = error
    return result


Trial = tuple[dict[str, Any], dict[str, Any] | None]  # (trial row, result or None: pending)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield ensure_schema(f"sqlite:///{tmp_path / 'results.db'}", create=True)
    dispose_engines()


@pytest.fixture
def store(engine: Engine) -> Callable[..., Engine]:
    """Register sweep ``name`` with its trials and record the results given."""

    def build(trials: list[Trial], name: str = "s", spec: dict[str, Any] = SPEC) -> Engine:
        with session_scope(engine, write=True) as session:
            register_sweep(session, name, spec, None, [row for row, _ in trials])
            for row, result in trials:
                if result is not None:
                    mark_running(session, name, row["trial_key"])
                    record_result(session, name, row["trial_key"], result)
        return engine

    return build


def _grid() -> list[Trial]:
    """2 methods × 3 rates, a rateless cast, the baseline, and one failed trial."""
    return [
        (_row("base", 0, "none", None), _result(60.7, 2.10)),
        (_row("dl1", 1, "drop_layers", 0.125), _result(69.9, 1.89)),
        (_row("dl2", 2, "drop_layers", 0.25), _result(75.6, 1.53)),
        (_row("dl3", 3, "drop_layers", 0.5), _result(106.4, 1.23)),
        (_row("hm1", 4, "head_mask", 0.25), _result(62.0, 2.04)),
        (_row("hm2", 5, "head_mask", 0.5), _result(70.0, 2.05)),   # dominated by hm1
        (_row("hm3", 6, "head_mask", 0.75), _result(95.0, 2.02)),  # dominated by dl1
        (_row("cast", 7, "cast", None, {"dtype": "bfloat16"}), _result(61.0, 1.80)),
        # Invalid: its numbers would dominate everything, and must never be drawn.
        (_row("bad", 8, "prune_heads", 0.5),
         _result(1.0, 0.1, status="failed",
                 error={"type": "InvalidEvaluationError", "reason": "invalid_evaluation",
                        "message": "saw later tokens"})),
    ]


def _plot(engine: Engine, out: Path, sweep: str = "s", **kwargs: Any) -> list[PlotFile]:
    with session_scope(engine) as session:
        return plot_sweep(session, sweep, out, **kwargs)


def _one(files: list[PlotFile], kind: str, fmt: str = "png", y: str | None = None) -> PlotFile:
    found = [f for f in files if f.kind == kind and f.format == fmt and (y is None or f.y == y)]
    assert len(found) == 1, found
    return found[0]


def _svg_series(path: Path) -> list[str]:
    return re.findall(r'id="(series-[^"]+)"', path.read_text(encoding="utf-8"))


def _svg_texts(path: Path) -> list[str]:
    """The texts of an SVG figure (matplotlib draws text as paths and names it in a comment)."""
    return re.findall(r"<!-- (.*?) -->", path.read_text(encoding="utf-8"), flags=re.S)


def _check_png(path: Path, min_colored: int = 2000) -> None:
    """A real 1600×1000 PNG that is not blank and has ``min_colored`` colored pixels."""
    import numpy as np

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1600, 1000)
        # A blank (single-colour) image has no spread; text, axes and markers give plenty.
        assert ImageStat.Stat(image.convert("L")).stddev[0] > 20.0
        # The series are drawn in color, not only the black-and-white axes and text.
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    colored = int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())
    assert colored >= min_colored, colored


# --------------------------------------------------------------------------- the plots


def test_quality_vs_speed_png_svg_series_and_front(store: Callable[..., Engine],
                                                   tmp_path: Path) -> None:
    files = _plot(store(_grid()), tmp_path / "plots", formats=("png", "svg"))
    png = _one(files, QUALITY_VS_SPEED)
    svg = _one(files, QUALITY_VS_SPEED, "svg")
    assert png.path == tmp_path / "plots" / f"{STEM}__quality_vs_speed.png"
    assert (png.x, png.y, png.model, png.dataset) == (
        "decode_ms_per_token", "perplexity", MODEL, DATASET)
    _check_png(png.path)
    assert png.series == ("baseline", "drop_layers", "head_mask", "cast")
    # The failed (invalid) trial is in no series, however good its numbers.
    assert sorted(_svg_series(svg.path)) == sorted(series_id(s) for s in png.series)
    assert 'id="pareto-front"' in svg.path.read_text(encoding="utf-8")
    texts = _svg_texts(svg.path)
    # Axis labels with the direction, the title, and each point labelled with its rate.
    assert {"decode_ms_per_token (lower is better)", "perplexity (lower is better)",
            "s: perplexity vs decode_ms_per_token", f"model {MODEL} · dataset {DATASET}",
            "Pareto front (4 trials)", "baseline", "cast"} <= set(texts)
    assert [t for t in texts if t in ("0.125", "0.25", "0.5", "0.75")].count("0.25") == 2
    # Fastest first along the front: every point no other beats on both axes.
    assert png.pareto == ("dl3", "dl2", "cast", "base")
    assert png.notes == ()


def test_metric_vs_rate_per_quality_and_score(store: Callable[..., Engine],
                                              tmp_path: Path) -> None:
    files = _plot(store(_grid()), tmp_path, formats=("png", "svg"))
    for metric in ("perplexity", "score"):
        png = _one(files, METRIC_VS_RATE, y=metric)
        svg = _one(files, METRIC_VS_RATE, "svg", y=metric)
        assert png.path.name == f"{STEM}__{metric}_vs_rate.png"
        _check_png(png.path)
        assert png.series == ("baseline", "drop_layers", "head_mask", "cast")
        assert sorted(_svg_series(svg.path)) == sorted(series_id(s) for s in png.series)
    texts = _svg_texts(_one(files, METRIC_VS_RATE, "svg", y="perplexity").path)
    # The reference lines are labelled with their values on the plot itself, and in the legend.
    assert {"baseline 60.7", "cast 61", "baseline: 60.7 (no compression)",
            "cast: 61 (no rate)", "perplexity (lower is better)", "rate"} <= set(texts)
    assert {"0.125", "0.25", "0.5", "0.75"} <= set(texts)  # the rates are the ticks


def test_only_the_formats_asked_for_are_written(store: Callable[..., Engine],
                                                tmp_path: Path) -> None:
    files = _plot(store(_grid()), tmp_path, formats=("svg",))
    assert {f.format for f in files} == {"svg"}
    assert sorted(p.name for p in tmp_path.glob("*.svg")) == sorted(f.path.name for f in files)
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(BadInput, match="--format must be one of png, svg"):
        _plot(store([]), tmp_path, formats=("pdf",))


def test_chosen_metrics_and_their_directions(store: Callable[..., Engine],
                                             tmp_path: Path) -> None:
    files = _plot(store(_grid()), tmp_path, formats=("png",), speed="decode_tokens_per_s",
                  metrics=["decode_tokens_per_s"])
    plot = _one(files, QUALITY_VS_SPEED)
    assert plot.x == "decode_tokens_per_s"
    # Higher tokens/s is better: the same trials as with ms/token, ordered by x (tokens/s).
    assert plot.pareto == ("base", "cast", "dl2", "dl3")
    rates = [f for f in files if f.kind == METRIC_VS_RATE]
    assert [f.y for f in rates] == ["decode_tokens_per_s"]
    # The short name of the decode rate is understood.
    again = _plot(store(_grid()), tmp_path / "alias", speed="tokens_per_s", metrics=["score"])
    assert _one(again, QUALITY_VS_SPEED).x == "decode_tokens_per_s"


def test_the_same_results_give_the_same_svg(store: Callable[..., Engine],
                                            tmp_path: Path) -> None:
    engine = store(_grid())
    first = _one(_plot(engine, tmp_path / "a", formats=("svg",)), QUALITY_VS_SPEED, "svg")
    second = _one(_plot(engine, tmp_path / "b", formats=("svg",)), QUALITY_VS_SPEED, "svg")
    assert first.path.read_bytes() == second.path.read_bytes()


def test_unknown_metric_lists_the_available_ones(store: Callable[..., Engine],
                                                 tmp_path: Path) -> None:
    engine = store(_grid())
    with pytest.raises(BadInput) as caught:
        _plot(engine, tmp_path, speed="tokens_per_sec")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--speed: unknown metric 'tokens_per_sec' in sweep 's'")
    assert "available: decode_ms_per_token, decode_tokens_per_s, perf_norm, perplexity" \
        in message
    with pytest.raises(BadInput, match="--metric: unknown metric 'acc'"):
        _plot(engine, tmp_path, metrics=["perplexity", "acc"])
    assert not list(tmp_path.glob("*.png"))


def test_a_sweep_with_only_a_baseline(store: Callable[..., Engine], tmp_path: Path) -> None:
    files = _plot(store([(_row("base", 0, "none", None), _result(60.7, 2.1))]), tmp_path,
                  formats=("png", "svg"))
    speed = _one(files, QUALITY_VS_SPEED)
    assert speed.series == ("baseline",) and speed.pareto == ("base",)
    _check_png(speed.path, min_colored=200)  # a black star in its red front ring
    for plot in files:
        assert plot.series == ("baseline",)
        if plot.format == "svg":
            assert _svg_series(plot.path) == ["series-baseline"]
    assert {f.y for f in files if f.kind == METRIC_VS_RATE} == {"perplexity", "score"}


def test_a_metric_missing_on_some_trials(store: Callable[..., Engine], tmp_path: Path) -> None:
    trials = [
        (_row("base", 0, "none", None), _result(60.7, 2.10)),
        (_row("dl1", 1, "drop_layers", 0.25), _result(75.6, 1.53)),
        (_row("dl2", 2, "drop_layers", 0.5), _result(106.4, None)),   # speed not measured
        (_row("hm1", 3, "head_mask", 0.5), _result(None, 2.0)),       # no perplexity
    ]
    files = _plot(store(trials), tmp_path, formats=("svg",))
    speed = _one(files, QUALITY_VS_SPEED, "svg")
    assert speed.series == ("baseline", "drop_layers")  # head_mask has no point left
    assert speed.pareto == ("dl1", "base")
    assert speed.notes == ("2 finished trial(s) without perplexity or decode_ms_per_token "
                           "not shown",)
    assert any("2 finished trial(s) without perplexity" in t for t in _svg_texts(speed.path))
    ppl = _one(files, METRIC_VS_RATE, "svg", y="perplexity")
    assert ppl.series == ("baseline", "drop_layers")
    assert ppl.notes == ("1 finished trial(s) without perplexity not shown",)


def test_a_sweep_without_finished_trials(store: Callable[..., Engine], tmp_path: Path) -> None:
    engine = store([
        (_row("base", 0, "none", None), None),
        (_row("dl1", 1, "drop_layers", 0.25),
         _result(70.0, 1.5, status="failed", error={"type": "RuntimeError", "message": "x"})),
    ])
    with pytest.raises(BadInput) as caught:
        _plot(engine, tmp_path / "plots")
    assert str(caught.value) == "no finished trials in sweep s; nothing to plot"
    assert not (tmp_path / "plots").exists()


def test_speed_only_within_the_baselines_hardware(store: Callable[..., Engine],
                                                  tmp_path: Path) -> None:
    trials = _grid()[:4] + [
        # Timed on another machine: it would look fastest, but is not comparable.
        (_row("wanda", 9, "wanda", 0.5), _result(64.0, 0.5, hardware=HW_B)),
    ]
    files = _plot(store(trials), tmp_path, formats=("svg",))
    speed = _one(files, QUALITY_VS_SPEED, "svg")
    assert "wanda" not in speed.series and "wanda" not in speed.pareto
    assert "series-wanda" not in _svg_series(speed.path)
    (note,) = speed.notes
    assert note.startswith("speed is comparable only within one hardware fingerprint: "
                           "showing the trials measured on the baseline's hardware (")
    assert note.endswith("1 trial(s) measured on other hardware left out")
    # Perplexity does not depend on the machine: there the trial is drawn.
    ppl = _one(files, METRIC_VS_RATE, "svg", y="perplexity")
    assert "wanda" in ppl.series and series_id("wanda") in _svg_series(ppl.path)
    # A score needs a comparable speed: none for it, and the figure says so.
    score = _one(files, METRIC_VS_RATE, "svg", y="score")
    assert "wanda" not in score.series and score.notes[0].startswith("1 finished trial(s)")


def test_without_a_baseline_the_most_common_hardware_is_kept(
        store: Callable[..., Engine], tmp_path: Path) -> None:
    trials = [
        (_row("a1", 0, "drop_layers", 0.25), _result(70.0, 1.5, hardware=HW_B)),
        (_row("a2", 1, "drop_layers", 0.5), _result(90.0, 1.2, hardware=HW_B)),
        (_row("b1", 2, "head_mask", 0.5), _result(65.0, 1.0)),
    ]
    speed = _one(_plot(store(trials), tmp_path, formats=("png",)), QUALITY_VS_SPEED)
    assert speed.series == ("drop_layers",)
    assert "the most common hardware (no finished baseline)" in speed.notes[0]


def test_one_figure_per_model_and_dataset(store: Callable[..., Engine], tmp_path: Path) -> None:
    trials: list[Trial] = []
    pairs = list(itertools.product(("org/llama-7b", "org/qwen-1.5b"), ("wikitext", "c4")))
    for model, dataset in pairs:
        n = len(trials)
        trials += [
            (_row(f"{model}{dataset}b", n, "none", None, model=model, dataset=dataset),
             _result(10.0, 2.0)),
            (_row(f"{model}{dataset}d", n + 1, "drop_layers", 0.5, model=model,
                  dataset=dataset), _result(15.0, 1.0)),
        ]
    files = _plot(store(trials, name="multi/run"), tmp_path, sweep="multi/run")
    speed = [f for f in files if f.kind == QUALITY_VS_SPEED]
    assert sorted((f.model, f.dataset) for f in speed) == sorted(pairs)
    assert sorted(f.path.name for f in speed) == sorted(
        f"multi_run__{m.replace('/', '_')}__{d}__quality_vs_speed.png" for m, d in pairs)
    assert len(files) == 3 * len(pairs)
    assert all(f.series == ("baseline", "drop_layers") for f in files)


def test_parameter_settings_of_one_method_are_series_of_their_own(
        store: Callable[..., Engine], tmp_path: Path) -> None:
    trials = [
        (_row("base", 0, "none", None), _result(60.0, 2.0)),
        (_row("t1", 1, "drop_layers", 0.25, {"from": "top"}), _result(70.0, 1.5)),
        (_row("t2", 2, "drop_layers", 0.5, {"from": "top"}), _result(90.0, 1.1)),
        (_row("b1", 3, "drop_layers", 0.25, {"from": "bottom"}), _result(80.0, 1.5)),
        (_row("q4", 4, "quantize", None, {"bits": 4}), _result(66.0, 1.7)),
        (_row("q8", 5, "quantize", None, {"bits": 8}), _result(61.0, 1.9)),
    ]
    files = _plot(store(trials), tmp_path, formats=("svg",))
    expected = ("baseline", "drop_layers (from=top)", "drop_layers (from=bottom)",
                "quantize (bits=4)", "quantize (bits=8)")
    for plot in files:
        assert plot.series == expected
        assert sorted(_svg_series(plot.path)) == sorted(series_id(s) for s in expected)
    assert series_id("drop_layers (from=top)") == "series-drop_layers_from_top"


def test_the_spec_names_the_quality_metric(store: Callable[..., Engine],
                                           tmp_path: Path) -> None:
    spec = {"name": "acc", "score": {"quality_metric": "accuracy", "weight": 0.5}}

    def acc(value: float, tpt: float) -> dict[str, Any]:
        result = _result(None, tpt)
        result["metrics"]["accuracy"] = {"value": value, "direction": "higher"}
        return result

    trials = [(_row("base", 0, "none", None), acc(0.70, 2.0)),
              (_row("h1", 1, "head_mask", 0.25), acc(0.69, 1.6)),
              (_row("h2", 2, "head_mask", 0.5), acc(0.60, 1.7))]
    files = _plot(store(trials, spec=spec), tmp_path, formats=("png",))
    speed = _one(files, QUALITY_VS_SPEED)
    assert speed.y == "accuracy" and speed.pareto == ("h1", "base")
    assert {f.y for f in files if f.kind == METRIC_VS_RATE} == {"accuracy", "score"}


def test_a_default_metric_nobody_measured_is_skipped_with_a_reason(
        store: Callable[..., Engine], tmp_path: Path) -> None:
    trials = [(_row("base", 0, "none", None), _result(60.0, None)),
              (_row("d", 1, "drop_layers", 0.5), _result(70.0, None))]
    skipped: list[str] = []
    files = _plot(store(trials), tmp_path, skipped=skipped)
    assert [(f.kind, f.y) for f in files] == [(METRIC_VS_RATE, "perplexity")]
    assert any("decode_ms_per_token" in reason for reason in skipped)
    assert any("score" in reason for reason in skipped)


# --------------------------------------------------------------------------- CLI


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from orchestrator.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_cli_prints_the_paths_written(store: Callable[..., Engine], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    engine = store(_grid())
    out_dir = tmp_path / "figs"
    code, out, err = _cli(capsys, "--db", str(engine.url), "plot", "s", "--out", str(out_dir),
                          "--format", "png", "--format", "svg", "--metric", "score")
    assert code == 0, err
    printed = [Path(line) for line in out.splitlines()]
    assert sorted(printed) == sorted(out_dir.glob("*.*"))
    assert sorted(p.name for p in printed) == sorted(
        f"{STEM}__{kind}.{fmt}" for kind in ("quality_vs_speed", "score_vs_rate")
        for fmt in ("png", "svg"))
    _check_png(out_dir / f"{STEM}__score_vs_rate.png")


def test_cli_bad_input_is_one_line_with_exit_2(store: Callable[..., Engine], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = str(store(_grid()).url)
    code, out, err = _cli(capsys, "--db", url, "plot", "s", "--out", str(tmp_path),
                          "--quality", "perplexty")
    assert code == 2 and out == ""
    assert err.startswith("error: --quality: unknown metric 'perplexty' in sweep 's' "
                          "(did you mean 'perplexity'?); available: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    code, _, err = _cli(capsys, "--db", url, "plot", "nope", "--out", str(tmp_path))
    assert code == 2 and err.startswith("error: unknown sweep 'nope'")
    code, _, err = _cli(capsys, "--db", url, "plot", "s", "--format", "gif")
    assert code == 2 and err == "error: --format must be one of png, svg, not 'gif'\n"
    assert not list(tmp_path.glob("*.png"))


def test_cli_notes_what_it_could_not_draw(store: Callable[..., Engine], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    trials = [(_row("base", 0, "none", None), _result(60.0, None)),
              (_row("d", 1, "drop_layers", 0.5), _result(70.0, None))]
    url = str(store(trials).url)
    code, out, err = _cli(capsys, "--db", url, "plot", "s", "--out", str(tmp_path))
    assert code == 0, err
    assert [Path(p).name for p in out.splitlines()] == [f"{STEM}__perplexity_vs_rate.png"]
    assert "note: no finished trial of sweep s stores decode_ms_per_token" in err
    code, out, err = _cli(capsys, "--db", url, "plot", "s", "--out", str(tmp_path),
                          "--metric", "score")
    assert code == 2 and out == ""
    assert err.startswith("error: nothing to plot in sweep s: ")
    assert len(err.splitlines()) == 1
