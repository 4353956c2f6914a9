"""Reference files (orchestrator/references.py) and the ones shipped in sweeps/references."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator import spec
from orchestrator.compare import trial_matches
from orchestrator.errors import BadInput
from orchestrator.references import (
    BadReference,
    load_reference_file,
    load_references,
    parse_references,
    reference_files,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "sweeps" / "references"

ENTRY = """\
  - table: Table 3
    model: meta-llama/Llama-2-7b-hf
    method: none
    dataset: wikitext
    metric: perplexity
    value: 5.12
    tolerance: 0.05
"""
PAPER = 'source:\n  title: "A paper"\n  arxiv: "2306.11695"\nentries:\n' + ENTRY


def _problems(text: str, file: str = "refs.yaml") -> list[str]:
    with pytest.raises(BadReference) as raised:
        parse_references(text, file)
    return raised.value.problems


def _one_problem(text: str) -> str:
    problems = _problems(text)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- shipped files


def test_every_shipped_file_loads_with_cited_sources() -> None:
    files = reference_files([SHIPPED])
    assert {f.name for f in files} == {"langoverrule.yaml", "s4_lab_notes.yaml",
                                       "exaone_competition.yaml", "wanda.yaml", "slicegpt.yaml"}
    for path in files:
        entries = load_reference_file(path)
        assert entries, path
        for entry in entries:
            source = entry.source
            assert source.title
            if source.kind == "paper":
                assert source.arxiv or source.venue
            else:
                assert source.location and "SEEDS.md" in source.location
    assert len(load_references([SHIPPED])) == 26


def test_shipped_numbers_are_the_given_ones() -> None:
    by_file = {path.name: load_reference_file(path) for path in reference_files([SHIPPED])}

    def values(name: str) -> list[tuple]:
        return [(e.method_label, e.rate, e.metric, e.value) for e in by_file[name]]

    assert values("wanda.yaml") == [
        ("none", None, "perplexity", 5.12), ("magnitude", 0.5, "perplexity", 14.89),
        ("sparsegpt", 0.5, "perplexity", 6.51), ("wanda", 0.5, "perplexity", 6.42)]
    assert by_file["wanda.yaml"][0].source.arxiv == "2306.11695"
    assert [e.known_method for e in by_file["wanda.yaml"]] == [True, False, False, False]
    assert values("slicegpt.yaml") == [("none", None, "perplexity", 5.47)] + [
        ("reduce_hidden (basis=pca)", rate, "perplexity", value)
        for rate, value in ((0.1, 5.89), (0.2, 6.64), (0.25, 7.24), (0.3, 8.12))]
    slicegpt = by_file["slicegpt.yaml"][0].source
    assert (slicegpt.arxiv, slicegpt.venue) == ("2401.15024", "ICLR 2024")
    assert slicegpt.cite() == "SliceGPT (ICLR 2024, arXiv 2401.15024)"
    # Accuracy is stored as a fraction by the multiple_choice evaluator s4_rates uses.
    assert values("s4_lab_notes.yaml") == [
        ("none", None, "acc", 0.7015),
        ("s4_heads (allocation=uniform, gamma=0.4)", 0.3, "acc", 0.4843),
        ("s4_heads (allocation=adaptive, gamma=0.4)", 0.3, "acc", 0.4857),
        ("s4_heads (allocation=adaptive, gamma=0.4)", 0.15, "acc", 0.4836)]
    assert by_file["s4_lab_notes.yaml"][0].source.cite() == "S-4 (lab notes)"
    assert values("langoverrule.yaml") == [
        ("none", None, "mdi_early", 1.58), ("none", None, "aei_early", 1.04),
        ("none", None, "mdi_middle", 10.23), ("none", None, "aei_middle", 3.51),
        ("none", None, "mdi_late", 17.37), ("none", None, "aei_late", 4.23)]
    assert by_file["langoverrule.yaml"][0].source.arxiv == "2508.10552"
    assert [(m.split(" ")[0], r, metric, v) for m, r, metric, v in values(
        "exaone_competition.yaml")] == [
        ("none", None, "score", 0.5), ("drop_layers", 0.0667, "score", 0.441),
        ("drop_layers", 0.0667, "perf_norm", 0.70), ("drop_layers", 0.0667, "speed_norm", 0.18),
        ("drop_layers", 0.1333, "score", 0.365), ("prune_heads", 0.25, "score", 0.310),
        ("cast", None, "score", 0.52)]


@pytest.mark.parametrize(("reference", "sweep"), [
    ("langoverrule.yaml", "langoverrule.yaml"),
    ("s4_lab_notes.yaml", "s4_rates.yaml"),
    ("exaone_competition.yaml", "exaone_lightweight.yaml"),
])
def test_shipped_entries_match_a_trial_of_their_sweep(reference: str, sweep: str) -> None:
    """Each entry names exactly one trial of the shipped spec it is reproduced with, and a
    metric that trial's evaluators store (or a computed one)."""
    from orchestrator.queries import COMPUTED_METRICS
    from workers.evaluators import evaluators

    loaded = spec.load(ROOT / "sweeps" / sweep, check_sources=False)
    trials = spec.expand(loaded)
    registry = evaluators()
    for entry in load_reference_file(SHIPPED / reference):
        matching = [t for t in trials if trial_matches(entry, t)]
        assert len(matching) == 1, (entry.method_label, entry.rate)
        dataset = next(d for d in loaded.datasets if d.name == entry.dataset)
        stored = {m for name in dataset.metrics or loaded.evaluation.metrics
                  for m in registry[name].metrics}
        assert entry.metric in stored | set(COMPUTED_METRICS), entry.metric


# --------------------------------------------------------------------------- the schema


def test_a_valid_file_gives_entries_with_their_source() -> None:
    text = PAPER + """\
  - model: meta-llama/Llama-2-7b-hf
    method: {name: reduce_hidden, params: {basis: pca}}
    rate: 0.25
    dataset: wikitext
    metric: perplexity
    value: 7.24
    tolerance: "5%"
    notes: slicing 25 %
"""
    first, second = parse_references(text, "refs.yaml")
    assert (first.file, first.index, first.line) == ("refs.yaml", 0, 5)
    assert (first.method, first.params, first.rate, first.tolerance_abs) == (
        "none", {}, None, 0.05)
    assert first.source.title == "A paper" and first.source.cite() == "A paper (arXiv 2306.11695)"
    assert (second.method, second.params, second.rate) == ("reduce_hidden", {"basis": "pca"}, 0.25)
    assert (second.tolerance, second.tolerance_pct, second.tolerance_text) == (None, 5.0, "5%")
    assert second.tolerance_abs == pytest.approx(0.362)
    assert second.method_label == "reduce_hidden (basis=pca)" and second.notes == "slicing 25 %"


@pytest.mark.parametrize(("source", "field", "words"), [
    ('  arxiv: "2306.11695"\n', "source.title", "required"),
    ('  title: "A paper"\n', "source", "arxiv or venue is required"),
    ('  title: "A paper"\n  kind: lab_notes\n', "source", "location"),
    ('  title: "A paper"\n  arxiv: 2306.11690\n', "source.arxiv", "quote the arXiv id"),
    ('  title: "A paper"\n  arxiv: "see the paper"\n', "source.arxiv", "not an arXiv id"),
    ('  title: "A paper"\n  venue: ICLR 2024\n  year: 2024\n', "source.year", "unknown field"),
])
def test_a_file_source_without_a_citation_rejects_its_entries_in_one_line(
        source: str, field: str, words: str) -> None:
    problem = _one_problem("source:\n" + source + "entries:\n" + ENTRY + ENTRY)
    assert re.match(r"refs\.yaml: line [1-4]: ", problem), problem  # at the file's source
    assert f"entries[0].{field}: " in problem and words in problem
    assert "(and 1 more entry)" in problem


def test_an_entry_source_replaces_the_files_and_is_checked_on_its_own() -> None:
    own = """\
    source: {title: "Other paper", venue: "NeurIPS 2023"}
"""
    # The file's source lacks arxiv and venue, but the only entry cites its own.
    entries = parse_references('source:\n  title: "A paper"\nentries:\n' + ENTRY + own)
    assert entries[0].source.cite() == "Other paper (NeurIPS 2023)"
    problem = _one_problem(PAPER + ENTRY + "    source: {title: Other}\n")
    assert "line 19: entries[1].source: arxiv or venue is required" in problem
    problem = _one_problem("entries:\n" + ENTRY)
    assert "entries[0].source: no source" in problem


def test_lab_notes_are_cited_by_location_not_an_invented_id() -> None:
    text = ("source:\n  title: Lab notes\n  kind: lab_notes\n  location: wiki/S4\nentries:\n"
            + ENTRY)
    (entry,) = parse_references(text)
    assert entry.source.arxiv is None and entry.source.cite() == "Lab notes (lab notes)"


@pytest.mark.parametrize(("change", "field", "words"), [
    ("    tolerance: 0.05\n", "tolerance", "required field is missing"),
    ("    tolerance: -1\n", "tolerance", "≥ 0"),
    ("    tolerance: 5 pct\n", "tolerance", "percentage"),
    ("    tolerance: true\n", "tolerance", "give a number"),
    ("    value: 5.12\n", "value", "required"),
    ("    metric: perplexity\n", "metric", "required"),
    ("    method: none\n", "method", "required"),
])
def test_missing_or_malformed_fields(change: str, field: str, words: str) -> None:
    replaced = {"    tolerance: -1\n", "    tolerance: 5 pct\n", "    tolerance: true\n"}
    if change in replaced:
        text = PAPER.replace("    tolerance: 0.05\n", change)
    else:
        text = PAPER.replace(change, "")
    problem = _one_problem(text)
    assert f"entries[0].{field}: " in problem and words in problem, problem


@pytest.mark.parametrize(("line", "replacement", "field", "words"), [
    ("    method: none\n", "    method: drop_layers\n", "rate", "needs a rate"),
    ("    method: none\n", "    method: none\n    rate: 0.5\n", "rate", "no rate"),
    ("    method: none\n", "    method: {name: cast, params: {dtype: float16}}\n    rate: 0.5\n",
     "rate", "has no rate"),
    ("    method: none\n", "    method: {name: reduce_hidden, params: {bsis: pca}}\n"
     "    rate: 0.25\n", "method.params.bsis", "did you mean 'basis'"),
    ("    method: none\n", "    method: {name: none, params: {a: 1}}\n", "method.params",
     "no params"),
    ("    method: none\n", "    method: {name: drop_layers, parms: {}}\n    rate: 0.5\n",
     "method.parms", "did you mean 'params'"),
    ("    method: none\n", "    method: 5\n", "method", "method name"),
    ("    method: none\n", "    method: drop_layers\n    rate: 25\n", "rate", "25 % is 0.25"),
    ("    metric: perplexity\n", "    metric: perplexty\n", "metric",
     "did you mean 'perplexity'"),
    ("    value: 5.12\n", '    value: "5.12"\n', "value", "valid number"),
    ("    value: 5.12\n", "    value: .nan\n", "value", "finite"),
    ("    value: 5.12\n", "    value: 5.12\n    valu: 5\n", "valu", "did you mean 'value'"),
])
def test_registry_and_value_checks(line: str, replacement: str, field: str, words: str) -> None:
    problem = _one_problem(PAPER.replace(line, replacement))
    assert f": entries[0].{field}: " in problem and words in problem, problem


def test_unknown_methods_are_allowed_and_marked() -> None:
    text = PAPER.replace("    method: none\n", "    method: sparsegpt\n    rate: 0.5\n")
    (entry,) = parse_references(text)
    assert (entry.method, entry.rate, entry.known_method) == ("sparsegpt", 0.5, False)


def test_every_problem_of_every_file_at_once_in_line_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(PAPER.replace("    value: 5.12\n", "")
                                     + ENTRY.replace("metric: perplexity", "metric: ppl"))
    (tmp_path / "b.yml").write_text(PAPER.replace("tolerance: 0.05", "tolerance: x"))
    (tmp_path / "notes.txt").write_text("not a reference")
    with pytest.raises(BadReference) as raised:
        load_references([tmp_path])
    problems = raised.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{tmp_path / 'a.yaml'}: line 5: entries[0].value")
    assert problems[1].startswith(f"{tmp_path / 'a.yaml'}: line 15: entries[1].metric")
    assert problems[2].startswith(f"{tmp_path / 'b.yml'}: line 11: entries[0].tolerance")
    assert str(raised.value).count("\n") == 2


@pytest.mark.parametrize(("text", "words"), [
    (PAPER.replace("  arxiv:", '  title: "Again"\n  arxiv:'), "duplicate key 'title'"),
    ("source: [unclosed\n", "invalid YAML"),
    ("- a\n- b\n", "YAML mapping with source and entries"),
    ("!!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ('source: {title: "A", arxiv: "2306.11695"}\nentries: []\n', "entries"),
    ('source: {title: "A", arxiv: "2306.11695"}\nentries: [5]\n', "an entry is a mapping"),
    (PAPER + "extra: 1\n", "extra: unknown field"),
])
def test_unreadable_or_unsafe_files_are_refused_in_one_line(text: str, words: str) -> None:
    problem = _one_problem(text)
    assert problem.startswith("refs.yaml: ") and words in problem, problem


def test_paths_files_directories_and_missing(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(PAPER)
    (tmp_path / "a.yml").write_text(PAPER.replace("5.12", "6.0"))
    files = reference_files([tmp_path, tmp_path / "a.yml"])
    assert [f.name for f in files] == ["a.yml", "b.yaml"]  # sorted, each once
    assert [e.value for e in load_references([tmp_path])] == [6.0, 5.12]
    with pytest.raises(BadInput, match="does not exist"):
        load_references([tmp_path / "missing.yaml"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="no reference file"):
        load_references([empty])
