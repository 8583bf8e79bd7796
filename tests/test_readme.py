"""The README's Python examples run as written, and its Quick start stays two commands."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_is_exactly_two_commands():
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert commands == ['pip install -e ".[test,demo]" && kdnumba demo', "python -m pytest"]


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example_runs(index):
    code = _blocks("python")[index]
    if "sklearn" in code:
        pytest.importorskip("sklearn", reason="the example needs the demo extra (scikit-learn)")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
