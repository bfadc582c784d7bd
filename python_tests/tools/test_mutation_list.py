"""The mutant list of scripts/mutation_test.py is well formed on the current tree (so it cannot rot silently)."""

import importlib.util
import sys
from pathlib import Path

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
