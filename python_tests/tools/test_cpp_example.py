"""The kernels as a C++ library without torch (CMakeLists.txt, examples/cpp, docs/cpp_api.md).

The CMake project is configured, built and installed into a temporary prefix; the example
is built against the install (``find_package(sss_ext)``) and inside a consumer project
(``add_subdirectory``), run, and its tokens compared with ``sss_ext.verify`` /
``sss_ext.sample`` on the same inputs and uniforms, rebuilt here from the example's formulas
(examples/cpp/example_inputs.h). The one source list (csrc/kernels/sources.txt) is checked
against the disk, setup.py and the install.
"""

import ast
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import sss_ext

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "csrc" / "kernels"
SOURCE_LIST = KERNELS / "sources.txt"
MISSING_TOOLS = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
needs_cmake = pytest.mark.skipif(
    bool(MISSING_TOOLS), reason=f"{' and '.join(MISSING_TOOLS)} not found: the C++ build needs CMake and a C++ compiler"
)
# Every CMake configure here leaves CUDA out: the CUDA build is checked in scripts/cuda_build_check.sh.
CPU_ONLY = ["-DSSS_EXT_KERNELS_CUDA=OFF"]


def listed_files():
    entries = [line.strip() for line in SOURCE_LIST.read_text().splitlines()]
    return [entry for entry in entries if entry and not entry.startswith("#")]


def setup_py_kernel_files(suffixes):
    """setup.py's own reader of the list, executed without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "kernel_files")
    namespace = {"os": os, "ROOT": str(ROOT)}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["kernel_files"](suffixes)


def run(command):
    """stdout and stderr of a command that must succeed."""
    result = subprocess.run([str(part) for part in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}"
    return result.stdout


def cmake_build(source, build, *options):
    """Configures and builds; the compiler must print no warning (the example builds with -Wall -Wextra)."""
    run(["cmake", "-S", source, "-B", build, *CPU_ONLY, *options])
    output = run(["cmake", "--build", build, "--parallel", "2"])
    assert "warning" not in output.lower(), output


@pytest.fixture(scope="module")
def install_prefix(tmp_path_factory):
    work = tmp_path_factory.mktemp("cmake_install")
    cmake_build(ROOT, work / "build", "-DSSS_EXT_KERNELS_EXAMPLES=OFF", f"-DCMAKE_INSTALL_PREFIX={work / 'prefix'}")
    run(["cmake", "--install", work / "build"])
    return work / "prefix"


@pytest.fixture(scope="module")
def example(install_prefix, tmp_path_factory):
    """verify_example built by examples/cpp as a standalone consumer of the installed package."""
    build = tmp_path_factory.mktemp("cmake_example")
    cmake_build(ROOT / "examples" / "cpp", build, f"-DCMAKE_PREFIX_PATH={install_prefix}")
    return build / "verify_example"


# --- the example's inputs, rebuilt from examples/cpp/example_inputs.h --------------------


def example_logits(model, batch, positions, vocab):
    """Shape: (batch, positions, vocab) float32."""
    b = torch.arange(batch).view(-1, 1, 1)
    i = torch.arange(positions).view(1, -1, 1)
    v = torch.arange(vocab).view(1, 1, -1)
    base = (v * 37 + b * 11 + i * 5) % 23
    perturbation = model * ((v * 5 + b + i * model) % 3)
    return (base - 11 + perturbation).float() / 4.0


def example_inputs(batch, num_draft_tokens, vocab_size):
    positions = num_draft_tokens + 1
    b = torch.arange(batch).view(-1, 1)
    i = torch.arange(positions).view(1, -1)
    draft_tokens = (5 * (22 - (b + i[:, :num_draft_tokens]) % 4 + 23 - (b * 11 + i[:, :num_draft_tokens] * 5) % 23)) % 23 % vocab_size
    target, draft, ref = (example_logits(model, batch, positions, vocab_size) for model in range(3))
    uniforms = ((b * 5 + i * 3) % 11).double() / 11.0 + 0.5 / 11.0
    sample_uniforms = ((torch.arange(batch) * 3 + 1) % 7).double() / 7.0 + 0.5 / 7.0
    return target, draft, ref, draft_tokens.reshape(batch, num_draft_tokens), uniforms, sample_uniforms


def parse_output(text):
    """Example output -> (tokens, num_accepted, log_z, sample_tokens) lists by row."""
    tokens, num_accepted, log_z, sample_tokens = [], [], [], []
    for line in text.splitlines():
        kind, row, *fields = line.split(" ")
        values = dict(field.split("=") for field in fields)
        if kind == "verify":
            assert int(row) == len(num_accepted)
            num_accepted.append(int(values["num_accepted"]))
            tokens.append([int(t) for t in values["tokens"].split(",")])
            log_z.append([float(z) for z in values["log_z"].split(",")])
        else:
            assert kind == "sample" and int(row) == len(sample_tokens), line
            sample_tokens.append(int(values["token"]))
    return tokens, num_accepted, log_z, sample_tokens


CONFIGS = {
    "defaults": {},
    "tempered top-k, 3 threads": {"temperature": 0.7, "top_k": 5, "threads": 3},
    "paper top-p": {"top_p": 0.9, "mode": "paper"},
    "greedy": {"temperature": 0},
    "standard SD": {"ref": 0, "num_draft": 3, "vocab": 23, "threads": 1},
    "no shift, top-k 1": {"shift": 0, "top_k": 1},
    "K=0, V=1": {"batch": 1, "num_draft": 0, "vocab": 1},
    "B=0": {"batch": 0},
    "large vocabulary": {"batch": 2, "num_draft": 2, "vocab": 50272, "top_p": 0.95, "temperature": 0.8},
}


def python_results(config, uniforms=None):
    """The op's results on the example's inputs under ``config`` (its defaults where absent)."""
    batch, num_draft_tokens, vocab_size = config.get("batch", 6), config.get("num_draft", 4), config.get("vocab", 40)
    target, draft, ref, draft_tokens, example_uniforms, sample_uniforms = example_inputs(batch, num_draft_tokens, vocab_size)
    sampling = {"temperature": config.get("temperature", 1.0), "top_k": config.get("top_k", 0), "top_p": config.get("top_p", 1.0)}
    out = sss_ext.verify(
        target, draft, draft_tokens, ref if config.get("ref", 1) else None,
        uniforms=example_uniforms if uniforms is None else uniforms,
        shift=config.get("shift", 1.0), mode=config.get("mode", "exact"), **sampling,
    )
    sample_tokens = sss_ext.sample(target[:, num_draft_tokens], uniforms=sample_uniforms, **sampling)
    return out.tokens.tolist(), out.num_accepted.tolist(), out.log_z, sample_tokens.tolist()


def example_args(config):
    return [f"{key}={value}" for key, value in config.items()]


# --- tests ---------------------------------------------------------------------------------


def test_source_list_matches_disk_and_setup_py():
    on_disk = sorted(str(path.relative_to(KERNELS)) for path in KERNELS.rglob("*") if path.is_file() and path != SOURCE_LIST)
    listed = listed_files()
    assert len(listed) == len(set(listed)), "csrc/kernels/sources.txt lists a file twice"
    assert sorted(listed) == on_disk, "csrc/kernels/sources.txt must list every file under csrc/kernels/ (and nothing else)"
    cuda_sources = [entry for entry in listed if entry.endswith(".cu")]
    assert cuda_sources, "no CUDA sources listed"
    assert setup_py_kernel_files(".cu") == [os.path.join("csrc", "kernels", entry) for entry in cuda_sources]


@needs_cmake
def test_install_holds_the_listed_headers_and_package_config(install_prefix):
    headers = sorted(entry for entry in listed_files() if entry.endswith((".h", ".cuh")))
    installed = install_prefix / "include" / "sss_ext" / "kernels"
    assert sorted(str(path.relative_to(installed)) for path in installed.rglob("*") if path.is_file()) == headers
    configs = list(install_prefix.rglob("sss_extConfig.cmake"))
    assert len(configs) == 1 and (configs[0].parent / "sss_extConfigVersion.cmake").is_file()


@needs_cmake
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_example_matches_python_op(example, config):
    tokens, num_accepted, log_z, sample_tokens = parse_output(run([example, *example_args(config)]))
    expected_tokens, expected_accepted, expected_log_z, expected_sample = python_results(config)
    assert tokens == expected_tokens
    assert num_accepted == expected_accepted
    assert sample_tokens == expected_sample
    log_z = torch.tensor(log_z, dtype=torch.float32).reshape(expected_log_z.shape)
    torch.testing.assert_close(log_z, expected_log_z, rtol=1e-6, atol=1e-7)


@needs_cmake
def test_example_inputs_are_discriminating(example):
    """The default run accepts 0 up to K drafts across rows, and other uniforms change its tokens."""
    tokens, num_accepted, _, sample_tokens = parse_output(run([example]))
    assert min(num_accepted) == 0 and max(num_accepted) == 4 and len(set(num_accepted)) >= 3
    assert len(set(sample_tokens)) >= 3
    batch, num_draft_tokens = len(tokens), len(tokens[0]) - 1
    flipped = 1.0 - example_inputs(batch, num_draft_tokens, 40)[4]
    assert python_results({}, uniforms=flipped)[0] != tokens


BAD_ARGUMENTS = ["vocab=0", "batch=-1", "top_p=0", "temperature=nan", "mode=paper ref=0", "vocab=1e300", "tokens"]


@needs_cmake
@pytest.mark.parametrize("argument", BAD_ARGUMENTS)
def test_example_rejects_bad_arguments(example, argument):
    result = subprocess.run([str(example), *argument.split()], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    key = argument.split("=")[0].split()[0]
    assert key in result.stderr and "usage:" in result.stderr


@needs_cmake
def test_add_subdirectory_consumer(example, tmp_path):
    """A project that vendors the repository with add_subdirectory gets the same tokens."""
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.22)\n"
        "project(consumer LANGUAGES CXX)\n"
        f'add_subdirectory("{ROOT.as_posix()}" sss_ext)\n'
        f'add_executable(consumer "{(ROOT / "examples" / "cpp" / "verify_example.cpp").as_posix()}")\n'
        "target_link_libraries(consumer PRIVATE sss_ext::kernels_cpu)\n"
    )
    cmake_build(consumer, tmp_path / "build")
    assert not (tmp_path / "build" / "sss_ext" / "examples").exists(), "a vendored copy must not build the examples"
    args = example_args(CONFIGS["tempered top-k, 3 threads"])
    assert run([tmp_path / "build" / "consumer", *args]) == run([example, *args])
