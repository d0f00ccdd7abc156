"""The Python examples of README.md and docs/*.md run, README has one per form, and its two commands are the
Makefile's and CI's."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
EXAMPLES = [(path.relative_to(ROOT).as_posix(), i, code) for path in DOCS
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]
README_EXAMPLES = [code for path, _, code in EXAMPLES if path == "README.md"]


@pytest.mark.parametrize("call", [r"sigmoid_focal_loss\(", r"(?<!\w)focal_loss\(", r"multilevel_focal_loss\(",
                                  r"quality_focal_loss\(|varifocal_loss\(|loss=\"(qfl|vfl|fl_star)\""])
def test_readme_has_an_example_per_form(call):
    """README's door: a running example of each form (dense, class-index, multi-level, the variants)."""
    assert any(re.search(call, code) for code in README_EXAMPLES), f"README has no example matching {call}"


@pytest.mark.parametrize("path, index, code", EXAMPLES, ids=[f"{p}-{i}" for p, i, _ in EXAMPLES])
def test_example_runs(path, index, code, capsys, monkeypatch):
    """Each example runs as a user runs it on a CPU (its tensors are CPU tensors, on a GPU machine too): on the
    pure-torch path. The kernels' semantics are checked by the rest of the suite, on the interpreter."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    exec(compile(code, f"{path} example {index}", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_two_commands_exist_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, flags=re.M) and re.search(r"^bench:", makefile, flags=re.M)
    assert "make test" in README and "make bench" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
