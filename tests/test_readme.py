"""Every python snippet in the README runs as written, and a snippet that
ends in an expression with a `# value` comment evaluates to that value."""

import ast
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
SNIPPETS = re.findall(r'```python\n(.*?)```', README.read_text(), re.DOTALL)


def run_snippet(index):
  """The snippet's namespace, and (expression, expected) of its last line if
  that is an expression with a `# value` comment."""
  code = SNIPPETS[index]
  namespace = {}
  exec(compile(code, f'README.md snippet {index}', 'exec'), namespace)
  last = code.strip().splitlines()[-1]
  expression, _, comment = last.partition('#')
  if not comment:
    return namespace, None
  return namespace, (expression.strip(), ast.literal_eval(comment.strip()))


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2


@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_snippet_runs(index):
  run_snippet(index)


def test_capsnet_snippet_shows_its_shapes_and_parameter_count():
  import jax  # pylint: disable=g-import-not-at-top
  namespace, claim = run_snippet(1)
  expression, expected = claim
  assert expression == 'out.lengths.shape, out.reconstructions.shape'
  assert eval(expression, namespace) == expected == ((8, 10), (8, 28, 28, 1))
  assert 'capsjax.CapsNet()  ' in SNIPPETS[1] and '8,215,568' in SNIPPETS[1]
  count = sum(leaf.size for leaf in jax.tree.leaves(namespace['params']))
  assert count == 8_215_568
