"""Every figure the README and the docs quote from a results file is in that file.

A paragraph (or table, or code block) that names files under ``benchmarks/results/`` quotes
them: each decimal number in it must be one of those files' numbers, as written or rounded to
the decimals the paragraph shows. Figures without a committed source are removed instead.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "benchmarks/README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
RESULT_FILE = re.compile(r"(?:benchmarks/)?results/([\w.-]+\.(?:md|csv|json))")
# A decimal figure (not part of a version such as 2.13.0, a path or an identifier).
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.]*\d)")


def blocks(text: str):
    """Paragraphs, tables and fenced code blocks, each as one string."""
    text = re.sub(r"```.*?```", lambda m: "\n\n" + m.group(0).replace("\n\n", "\n") + "\n\n", text, flags=re.S)
    return [block for block in re.split(r"\n\s*\n", text) if block.strip()]


def file_numbers(names) -> list[str]:
    numbers = []
    for name in names:
        # a sign only where no digit precedes it: "0.72-1.04x" is two numbers, not 0.72 and -1.04
        numbers += re.findall(r"(?:(?<![\w.])[-+])?\d+(?:\.\d+)?(?:e[-+]?\d+)?", (REPO / "benchmarks" / "results" / name).read_text())
    return numbers


def quoted(figure: str, numbers: list[str]) -> bool:
    decimals = len(figure.split(".")[1])
    value = float(figure)
    for number in numbers:
        if number == figure or number.lstrip("+") == figure.lstrip("+"):
            return True
        try:
            if abs(round(float(number), decimals) - value) < 10 ** -(decimals + 3):
                return True
        except ValueError:
            continue
    return False


def quotes(document: str):
    """(block, named results files, figures) of every block of `document` that names results files."""
    for block in blocks((REPO / document).read_text()):
        names = sorted(set(RESULT_FILE.findall(block)))
        if names:
            yield block, names, FIGURE.findall(block)


@pytest.mark.parametrize("document", DOCS)
def test_quoted_figures_are_in_their_results_files(document):
    unsourced = []
    for block, names, figures in quotes(document):
        missing_files = [n for n in names if not (REPO / "benchmarks" / "results" / n).exists()]
        assert not missing_files, f"{document} names results files that do not exist: {missing_files}"
        numbers = file_numbers(names)
        unsourced += [(figure, names, block[:120]) for figure in figures if not quoted(figure, numbers)]
    assert not unsourced, f"{document} quotes figures its results files do not hold:\n" + "\n".join(map(str, unsourced))


def test_the_checker_finds_an_unsourced_figure(tmp_path):
    """Negative control: a figure that is not in the named file is reported."""
    numbers = file_numbers(["demo_cpu.md"])
    assert quoted("0.777", numbers) and quoted("51.5", numbers)
    assert not quoted("0.778", numbers) and not quoted("49.9", numbers)
