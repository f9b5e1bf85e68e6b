"""The README's examples work as written."""

import re
from pathlib import Path

from hpo.spaces import parse_space

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_space_example_is_valid():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1

    space = parse_space(blocks[0], "README.md")

    assert space.name == "convae-small"
    assert [stage.name for stage in space.stages] == ["loss", "arch"]
