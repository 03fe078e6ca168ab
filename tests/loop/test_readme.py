"""The README's Python example runs as written (on the embedded default model)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.skipif(not README.is_file(), reason="the README travels with the repository, not the wheel")
def test_readme_python_example_runs(capsys):
    section = README.read_text().split("## Decode loop (`eagle2`)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()
