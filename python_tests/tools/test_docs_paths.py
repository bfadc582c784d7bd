"""Every repository path the README and the docs name exists: in code spans (commands
included, a word at a time) and in relative links. A path counts when it starts at a top-level
folder or file of the repository; globs (``*.cu``) must match something."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
        "benchmarks/README.md", "sss_ext/models/README.md"]
TOP_LEVEL = ("csrc/", "sss_ext/", "python_tests/", "docs/", "scripts/", "benchmarks/", "examples/", "cmake/", ".ci/",
             "setup.py", "pyproject.toml", "CMakeLists.txt", "requirements.txt", "requirements-models.txt",
             "constraints.txt", "pytest.ini")
# docs/cpp_api.md spells the kernels' headers as they are included: <sss_ext/kernels/...>.
INCLUDE_PREFIX = ("sss_ext/kernels/", "csrc/kernels/")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def named_paths(document: str):
    """(path as named, path relative to the repository) of every path ``document`` names."""
    text = (REPO / document).read_text()
    text = re.sub(r"```.*?```", lambda block: block.group(0).replace("\n", " "), text, flags=re.S)
    for span in CODE_SPAN.findall(text):
        for word in re.split(r"[\s,;()\"'=]+", span):
            word = word.rstrip(".:")
            if word.startswith(INCLUDE_PREFIX[0]):
                yield word, INCLUDE_PREFIX[1] + word[len(INCLUDE_PREFIX[0]):]
            elif word.startswith(TOP_LEVEL):
                yield word, word
    for target in LINK.findall(text):
        if "://" in target:
            continue
        yield target, (Path(document).parent / target).as_posix()


def exists(path: str) -> bool:
    resolved = (REPO / path).resolve()
    if any(ch in path for ch in "*?["):
        return any(REPO.glob(str(resolved.relative_to(REPO))))
    return resolved.exists()


@pytest.mark.parametrize("document", DOCS)
def test_every_named_path_exists(document):
    missing = []
    for named, path in named_paths(document):
        if not exists(path):
            missing.append(named)
    assert missing == [], f"{document} names paths that do not exist: {sorted(set(missing))}"


def test_the_checker_sees_paths():
    """Negative control: a README path is found, and a path that is not there is reported."""
    found = {named for named, _ in named_paths("README.md")}
    assert {"scripts/setup_env.sh", "csrc/ops.cpp", "docs/testing.md"} <= found
    assert not exists("sss_ext/no_such_module.py") and exists("csrc/kernels/cuda/instantiate/*.cu")
