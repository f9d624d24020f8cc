"""The documentation: every ```python block of the README and of docs/ runs as pasted, each in a fresh interpreter
in an empty folder (what a reader does), and the site builds with warnings as errors (scripts/docs.sh's build), so
a docstring or a page that breaks it fails here."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                           recursive=True)
                               if "_build" not in p)
BLOCKS = [(page, i, block) for page in PAGES
          for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", open(os.path.join(ROOT, page)).read(),
                                               re.S | re.M))]


def test_the_readme_and_the_docs_have_their_examples():
    assert sum(page == "README.md" for page, _, _ in BLOCKS) >= 3
    assert sum(page.startswith("docs/") for page, _, _ in BLOCKS) >= 30


@pytest.mark.parametrize("page,i,block", BLOCKS, ids=[f"{p}:{i + 1}" for p, i, _ in BLOCKS])
def test_block_runs_as_pasted(page, i, block, tmp_path):
    env = dict(os.environ)
    env.pop("FASTGRAD_TEST_DEVICE", None)
    p = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{page}, python block {i + 1}:\n{block}\n{p.stderr[-3000:]}"


def test_the_site_builds_without_warnings(tmp_path):
    # the build scripts/docs.sh runs (its dependencies come from scripts/setup.sh: the docs extra)
    p = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        os.path.join(ROOT, "docs"), str(tmp_path / "html")], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-5000:]
    import fastgrad.method as M
    table = (tmp_path / "html" / "estimators" / "index.html").read_text()
    api = (tmp_path / "html" / "api" / "method.html").read_text()
    for name in M.__all__:  # the generated table lists every estimator, the API reference every name
        cls = getattr(M, name)
        if isinstance(cls, type) and issubclass(cls, M.Method) and cls.facts is not None:
            assert f"fastgrad.method.{cls.__name__}" in table, name
        assert f'id="fastgrad.method.{name}"' in api or cls.__name__ != name, name


def test_the_readme_is_a_library_readme():
    import fastgrad.method as M
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 200
    assert text.startswith("# fastgrad\n")
    for name in M.__all__:  # every estimator of the graph API is listed
        cls = getattr(M, name)
        if isinstance(cls, type) and issubclass(cls, M.Method) and cls.facts is not None:
            assert f"`{cls.__name__}`" in text, name
    for link in re.findall(r"\]\(((?:docs/|benchmarks/|LICENSE|CHANGELOG)[^)#]*)", text):
        assert os.path.exists(os.path.join(ROOT, link)), link
