"""The mutant list of scripts/mutation_test.py is well formed on the current tree (so it cannot rot silently)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mutation_test", ROOT / "scripts" / "mutation_test.py")
mutation_test = importlib.util.module_from_spec(spec)
sys.modules.setdefault("mutation_test", mutation_test)  # dataclasses look their module up
spec.loader.exec_module(mutation_test)
MUTANTS = mutation_test.MUTANTS


def test_at_least_thirty_mutants_with_unique_ids():
    ids = [m.id for m in MUTANTS]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)


def test_every_old_text_occurs_exactly_once():
    for m in MUTANTS:
        text = (ROOT / m.file).read_text()
        assert text.count(m.old) == 1, f"{m.id}: {m.old!r} occurs {text.count(m.old)} times in {m.file}"
        assert m.new != m.old, m.id


def test_every_area_is_covered():
    areas = {m.area for m in MUTANTS}
    assert set(mutation_test.AREAS) <= areas, set(mutation_test.AREAS) - areas
    assert "other" not in areas


def test_each_mutant_names_tests_and_a_description():
    for m in MUTANTS:
        assert m.tests and m.description.strip(), m.id
        if m.kind == "cuda":
            assert m.tests == (mutation_test.CUDA_ALL,), m.id
        else:
            assert all((ROOT / t).exists() for t in m.tests if t.startswith("python_tests/")), m.id


def _run(started):
    return {"run_started": started, "run_commit": "abc", "run_command": f"python scripts/mutation_test.py ({started})",
            "run_wall_s": "60", "run_state": "finished", "run_machine": "test machine"}


def test_a_partial_run_merges_into_the_report_with_each_rows_run(tmp_path, monkeypatch):
    monkeypatch.setattr(mutation_test, "RESULTS", tmp_path)
    first, second, changed = MUTANTS[0], MUTANTS[1], MUTANTS[2]
    Result = mutation_test.Result
    mutation_test.write_report([Result(m.id, m.area, "killed", 1.0, "x", _run("R-first")) for m in (first, second, changed)],
                               merge=False)
    # the third mutant's definition changes after the first run: its row is stale
    monkeypatch.setattr(mutation_test, "MUTANTS", [first, second, mutation_test.dataclasses.replace(changed, new=changed.new + " "),
                                                   *MUTANTS[3:]])
    mutation_test.write_report([Result(second.id, second.area, "survived", 2.0, "y", _run("R-second"))], merge=True)
    rows = {row["id"]: row for row in mutation_test.csv.DictReader(open(tmp_path / "mutation.csv", newline=""))}
    assert rows[first.id]["outcome"] == "killed" and rows[first.id]["run_started"] == "R-first"
    assert rows[second.id]["outcome"] == "survived" and rows[second.id]["run_started"] == "R-second"
    assert changed.id not in rows
    report = (tmp_path / "mutation.md").read_text()
    assert "**Score: 1 killed of 2 = 50.0%**" in report and f"not run {len(MUTANTS) - 2}" in report and f"`{changed.id}`" in report
    assert "(R-first)" in report and "(R-second)" in report

    mutation_test.write_report([Result(first.id, first.area, "killed", 1.0, "x", _run("R-third"))], merge=False)
    rows = list(mutation_test.csv.DictReader(open(tmp_path / "mutation.csv", newline="")))
    assert [row["id"] for row in rows] == [first.id]  # a run without merging replaces the report


def test_python_mutants_need_the_extension_built_in_the_tree(tmp_path, monkeypatch, capsys):
    """Without sss_ext/_C*.so in the tree the copies cannot import the op: the runner refuses
    rather than count every failing import as a killed mutant."""
    (tmp_path / "sss_ext").mkdir()
    python = next(m for m in MUTANTS if m.kind == "python")
    (tmp_path / python.file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / python.file).write_text((ROOT / python.file).read_text())
    monkeypatch.setattr(mutation_test, "ROOT", tmp_path)
    with pytest.raises(SystemExit):
        mutation_test.main(["--only", python.id, "--no-report"])
    assert "no built extension" in capsys.readouterr().err
