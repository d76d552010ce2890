"""Every python snippet in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
SNIPPETS = re.findall(r'```python\n(.*?)```', README.read_text(), re.DOTALL)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2


@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_snippet_runs(index):
  exec(compile(SNIPPETS[index], f'README.md snippet {index}', 'exec'), {})
