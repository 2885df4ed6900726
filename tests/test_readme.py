"""The README's core example runs as written, and its claims about leak and prediction hold."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_core_example_runs_and_stays_in_the_subspace(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "collect_kfac_factors" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    from crispedit_easyedit.optim import leak_fraction

    assert leak_fraction(namespace["delta"], namespace["projector"].project) < 1e-5
    assert namespace["delta"].norm() > 0
    assert "predicted capability-loss increase" in capsys.readouterr().out


def test_readme_opens_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("scripts/bootstrap.sh")]
    assert len(commands) == 2
    assert ".venv/bin/crispedit edit" in commands[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1].split("#")[0].strip() in ci  # CI runs the README's test command verbatim
