"""RESULTS.md and BENCHMARKS.md against the committed result files they cite (and docs/method.md
against the shared specification, which it copies with gr_jax's conventions added in marked blocks).

The reproduction tables are written by hand from `results/*.json`; these tests keep the two from
drifting apart: every cited file exists, and every table row that cites a results file reports that
file's average incremental accuracy and last accuracy (mean ± std over seeds where it has several).
"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_CITED = re.compile(r"`(?:results/)?([A-Za-z0-9_.-]+\.json)`")
_NUMBER = re.compile(r"^(-?\d+\.\d+)(?: ± (\d+\.\d+))?$")


def _cited_result_files(doc: str) -> set[str]:
  names = set(_CITED.findall((ROOT / doc).read_text()))
  return {n for n in names if n != "results.json" and not n.startswith("cifar100_lt_selection")}


@pytest.mark.parametrize("doc", ["RESULTS.md", "BENCHMARKS.md"])
def test_every_cited_result_file_is_committed(doc):
  cited = _cited_result_files(doc)
  assert cited, f"{doc} cites no result files"
  missing = sorted(n for n in cited if not (ROOT / "results" / n).is_file())
  assert not missing, f"{doc} cites result files that are not in results/: {missing}"


def _table_rows_citing_results():
  """(row text, file name, [(mean, std or None), ...] numeric cells in order) per table row."""
  for line in (ROOT / "RESULTS.md").read_text().splitlines():
    if not line.startswith("|"):
      continue
    cited = _CITED.findall(line)
    if len(cited) != 1:
      continue
    numbers = []
    for cell in line.strip("|").split("|"):
      m = _NUMBER.match(cell.strip().strip("*").strip())
      if m:
        numbers.append((float(m.group(1)), float(m.group(2)) if m.group(2) else None))
    yield line, cited[0], numbers


def test_result_tables_report_the_cited_files():
  rows = list(_table_rows_citing_results())
  assert len(rows) >= 20, "expected the reproduction tables of RESULTS.md"
  for line, name, numbers in rows:
    result = json.loads((ROOT / "results" / name).read_text())
    assert len(numbers) >= 2, f"no AIA and last accuracy in: {line}"
    for (shown, shown_std), key in zip(numbers[:2], ("average_incremental_accuracy",
                                                      "last_accuracy")):
      assert shown == pytest.approx(result[key], abs=0.0051), (name, key, line)
      if shown_std is not None:
        assert shown_std == pytest.approx(result[f"{key}_std"], abs=0.0051), (name, key, line)


# A blank line, then a blockquote opening with the marker: where gr_jax fills a gap of the spec.
_CONVENTION_BLOCK = re.compile(
    r"\n\n> \*\*gr_jax convention \(the spec is silent\):\*\*[^\n]*(?:\n>[^\n]*)*")


def test_method_spec_is_the_shared_one():
  """docs/method.md, which the docstrings cite, is the project's shared specification plus
  gr_jax's marked convention blocks, and nothing else."""
  shared = ROOT.parent / "shared" / "docs" / "method.md"
  if not shared.is_file():
    pytest.skip(f"the shared specification is not at {shared}")
  ours = (ROOT / "docs" / "method.md").read_text()
  assert _CONVENTION_BLOCK.search(ours), "docs/method.md has lost its gr_jax convention block"
  assert _CONVENTION_BLOCK.sub("", ours) == shared.read_text(), (
      "docs/method.md, without its '> **gr_jax convention (the spec is silent):**' blocks, differs "
      "from ../shared/docs/method.md: copy the shared one over it and keep only those blocks")


def test_readme_numbers_are_those_of_results_md():
  """Every 'mean ± std' of README.md's table is in RESULTS.md's summary table, in the same row."""
  summary = (ROOT / "RESULTS.md").read_text().split("## Summary", 1)[1].split("\n## ", 1)[0]
  readme_rows = [l for l in (ROOT / "README.md").read_text().splitlines()
                 if l.startswith("|") and "±" in l]
  assert readme_rows, "README.md has no results table"
  for row in readme_rows:
    setting = row.strip("|").split("|")[0].strip()
    matches = [l for l in summary.splitlines()
               if l.startswith("|") and l.strip("|").split("|")[0].strip().startswith(setting)]
    assert len(matches) == 1, f"RESULTS.md's summary has no single row for {setting!r}"
    for number in re.findall(r"\d+\.\d+ ± \d+\.\d+", row):
      assert number in matches[0], f"README's {number} ({setting}) is not in: {matches[0]}"
