"""README.md's Python examples run, and its two commands are the Makefile's and CI's."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys, monkeypatch):
    """Each example runs as a user runs it on a CPU (its tensors are CPU tensors, on a GPU machine too): on the
    pure-torch path. The kernels' semantics are checked by the rest of the suite, on the interpreter."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_two_commands_exist_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, flags=re.M) and re.search(r"^bench:", makefile, flags=re.M)
    assert "make test" in README and "make bench" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
