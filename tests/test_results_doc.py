"""RESULTS.md, BENCHMARKS.md and docs/notes/ against the committed files they cite (and
docs/method.md against the shared specification, which it copies with gr_jax's conventions added in
marked blocks).

The tables are written by hand from `results/`; these tests keep the two from drifting apart:
every cited file exists; every table row that cites one results file reports that file's numbers in
the columns it names (mean ± std over seeds, per-seed values, phase-0 accuracy); the derived tables
(paired differences, diagnostics, benchmark figures) are recomputed from their files; README's
table quotes RESULTS.md's summary. A number written with d decimals must equal the file's value
rounded to d decimals (half a unit of its last digit).
"""

import json
import math
import pathlib
import re

import numpy as np
import pytest

from gr_jax import diagnostics

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DOCS = ["RESULTS.md", "BENCHMARKS.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "notes").glob("*.md"))
_CITED = re.compile(r"`(?:results/)?([A-Za-z0-9_.-]+\.(?:json|npz))`")
_IMAGE = re.compile(r"\]\((results/[^)\s]+)\)")
_NUMBER = re.compile(r"^([+−-]?)(\d[\d,]*(?:\.\d+)?)(?: ± (\d+(?:\.\d+)?))?(?: (?:s|GiB|%))?$")
_NOT_RESULTS = {"results.json", "cifar100.npz", "cifar100_lt.npz", "cifar100_lt_selection.json"}
_RANGE = re.compile(r"^(\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)(?: s)?$")


def _text(doc: str) -> str:
  return (ROOT / doc).read_text()


def _cited(text: str) -> list[str]:
  """Result files named in ``text`` (not a run's own results.json, nor the data)."""
  return [n for n in _CITED.findall(text) if n not in _NOT_RESULTS]


def _load(name: str):
  return json.loads((RESULTS / name).read_text())


def _half_unit(number: str) -> float:
  """Half a unit of the last written digit of ``number``: how far the file's value may be."""
  return 0.5 * 10**-(len(number.split(".")[1]) if "." in number else 0) + 1e-9


def _number(cell: str):
  """(value, std or None) of a table cell such as '33.82 ± 0.68', '−0.67', '31,582', '258 s'."""
  m = _NUMBER.match(cell)
  if not m:
    return None
  sign, value, std = m.groups()
  return (-1 if sign in ("−", "-") else 1) * float(value.replace(",", "")), std


def _close(cell: str, value, std=None, where=""):
  parsed = _number(cell)
  assert parsed, f"not a number: {cell!r} ({where})"
  shown, shown_std = parsed
  tol = _half_unit(_NUMBER.match(cell).group(2))
  assert abs(shown - value) <= tol, f"{where}: shows {cell!r}, the file has {value}"
  if shown_std is not None:
    assert std is not None, f"{where}: {cell!r} has a ± the file does not"
    assert abs(float(shown_std) - std) <= _half_unit(shown_std), (
        f"{where}: shows {cell!r}, the file's std is {std}")


def _clean(cell: str) -> str:
  return cell.strip().replace("**", "").strip()


def tables(doc: str):
  """(header, rows) of every Markdown table of ``doc``, cells stripped of bold."""
  lines = _text(doc).splitlines() + [""]
  block = []
  for line in lines:
    if line.startswith("|"):
      block.append([_clean(c) for c in line.strip().strip("|").split("|")])
      continue
    if len(block) > 2:
      yield block[0], block[2:]
    block = []


def table(doc: str, header_start: str):
  """The one table of ``doc`` whose first header cell starts with ``header_start``."""
  found = [t for t in tables(doc) if t[0][0].startswith(header_start)]
  assert len(found) == 1, f"{doc}: {len(found)} tables start with {header_start!r}"
  return found[0]


def rows_by_label(rows) -> dict[str, list[str]]:
  return {row[0].replace("`", ""): row for row in rows}


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_result_file_is_committed(doc):
  text = _text(doc)
  missing = sorted({n for n in _cited(text) if not (RESULTS / n).is_file()} |
                   {p for p in _IMAGE.findall(text) if not (ROOT / p).is_file()})
  assert not missing, f"{doc} cites files that are not in results/: {missing}"


def test_the_reference_pages_cite_result_files():
  for doc in ("RESULTS.md", "BENCHMARKS.md"):
    assert _cited(_text(doc)), f"{doc} cites no result files"


# Columns of run tables and where their numbers are in a results.json.
def _shot(group):
  return lambda r: (r["shot_accuracy"][group], r["shot_accuracy"].get(f"{group}_std"))


_COLUMNS = {
    "n": lambda r: (len(r["seeds"]), None),
    "AIA": lambda r: (r["average_incremental_accuracy"], r.get("average_incremental_accuracy_std")),
    "last": lambda r: (r["last_accuracy"], r.get("last_accuracy_std")),
    "many": _shot("many"), "medium": _shot("medium"), "few": _shot("few"),
    "avg. forgetting": lambda r: (r["average_forgetting"], r.get("average_forgetting_std")),
    "all test images": lambda r: (r["last_accuracy_weighted"], r.get("last_accuracy_weighted_std")),
    "phase-0 accuracy": lambda r: (r["acc_tag"][0][0], None),
    "`wall_time_s`": lambda r: (r["wall_time_s"], None),
}


def _per_seed_value(result, seed: int, what: str) -> float:
  one = result["per_seed"][result["seeds"].index(seed)] if "per_seed" in result else result
  if "phase-0" in what:
    return one["acc_tag"][0][0]
  if "AIA" in what:
    return one["average_incremental_accuracy"]
  assert "last" in what, f"a per-seed row must say AIA, last or phase-0: {what!r}"
  return one["last_accuracy"]


def _run_rows():
  """(doc, header, row, file) of every row that cites one results.json, in tables of runs."""
  for doc in DOCS:
    for header, rows in tables(doc):
      if "AIA" not in header and not any(re.fullmatch(r"seed \d+", c) for c in header):
        continue
      for row in rows:
        cited = _cited(" | ".join(row))
        if len(cited) == 1 and cited[0].startswith(("cifar100_", "tinyimagenet")):
          yield doc, header, row, cited[0]


def test_run_tables_report_the_cited_files():
  checked = 0
  for doc, header, row, name in _run_rows():
    result = _load(name)
    where = f"{doc}, {name}, row {row[0]!r}"
    seen = set()
    for column, cell in zip(header[1:], row[1:]):
      seed = re.fullmatch(r"seed (\d+)", column)
      if seed:
        _close(cell, _per_seed_value(result, int(seed.group(1)), header[0] + " " + row[0]),
               where=f"{where}, {column}")
        seen.add("seed")
      elif column in _COLUMNS:
        value, std = _COLUMNS[column](result)
        if cell == "—":
          assert value is None, f"{where}: {column} is — but the file has {value}"
        elif _RANGE.match(cell):
          low, high = map(float, _RANGE.match(cell).groups())
          assert low - 0.5 <= value <= high + 0.5, f"{where}: {column} {cell!r} vs {value}"
        else:
          _close(cell, value, std, where=f"{where}, {column}")
        seen.add(column)
    assert seen & {"AIA", "seed"}, f"{where}: the row reports no AIA"
    checked += 1
  assert checked >= 60, f"only {checked} table rows cite a results file"


def _paired(ablation: dict, dgr: dict, key: str) -> tuple[float, float]:
  """Mean ± standard error (ddof = 1) over seeds of ablation − DGR."""
  def value(one):
    return one["shot_accuracy"]["few"] if key == "few" else one[key]
  assert ablation["seeds"] == dgr["seeds"]
  diff = np.array([value(a) - value(d) for a, d in zip(ablation["per_seed"], dgr["per_seed"])])
  return diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff))


def test_component_table_is_the_paired_differences():
  header, rows = table("RESULTS.md", "ablation − DGR")
  files = {"without the logit prior": "no_prior", "without DAKD (plain KD)": "no_dakd",
           "GR without DGR (no decoupling)": "no_dgr"}
  splits = {"LFS 20 × 5": "cifar100_lt_lfs20", "LFH 50 + 10 × 5": "cifar100_lt_lfh50_10x5"}
  keys = {"AIA": "average_incremental_accuracy", "last": "last_accuracy", "few": "few"}
  assert sorted(rows_by_label(rows)) == sorted(files)
  for row in rows:
    for column, cell in zip(header[1:], row[1:]):
      split, key = column.split(": ")
      mean, se = _paired(_load(f"{splits[split]}_{files[row[0]]}_5seeds.json"),
                         _load(f"{splits[split]}_dgr_5seeds.json"), keys[key])
      _close(cell, mean, se, where=f"{row[0]}, {column}")


def test_readme_numbers_are_those_of_results_md():
  """README's paper and 5-seed AIA columns quote RESULTS.md's summary row of that setting."""
  header, rows = table("RESULTS.md", "setting")
  summary, setting = {}, None
  for row in rows:
    setting = row[0] or setting
    summary[setting, row[1]] = dict(zip(header, row))
  readme = [l for l in _text("README.md").splitlines() if l.startswith("|")]
  readme_header = [_clean(c) for c in readme[0].strip("|").split("|")]
  assert len(readme) > 2, "README.md has no results table"
  for line in readme[2:]:
    cells = dict(zip(readme_header, (_clean(c) for c in line.strip("|").split("|"))))
    setting = cells[readme_header[0]]
    for column, cell in cells.items():
      method = ("fine-tuning + exemplars" if "fine-tuning" in column else
                "DGR" if "DGR" in column else None)
      if column == "paper":
        assert cell == summary[setting, "DGR"]["paper, AIA"], (setting, cell)
      elif method:
        row = summary[setting, method]
        assert cell == row["AIA"], f"README's {cell} ({setting}, {method}) is not {row['AIA']}"
        seeds = re.search(r"\((\d+) seeds\)", column)
        assert seeds and seeds.group(1) == row["n"], (column, row["n"])


def _diagnostics(method: str) -> dict:
  with np.load(RESULTS / f"diagnostics_lfs20_{method}_s0_h200_7296f3a.npz") as z:
    return dict(z)


def _diagnostics_rows(d: dict) -> dict[str, str]:
  """The diagnostics table's cells of one run, computed from its diagnostics.npz."""
  old, new = d["old_classes"][-1], d["new_classes"][-1]
  norm, phi = d["weight_norm"][-1], d["cumulative_norms"][-1]
  forget = diagnostics.class_forgetting(d)
  counts = d["train_counts"][-1]
  lost = d["lost_counts"][-1] / np.maximum(counts, 1)
  has = ~np.isnan(forget)
  pearson, spearman = diagnostics.correlations(lost[has], forget[has])
  slope = np.polyfit(lost[has], forget[has], 1)[0]
  none_lost, most_lost = has & (lost == 0), has & (lost >= 0.8)
  arrival = np.arange(len(norm))
  span = lambda x, fmt: f"{fmt.format(x.min())}–{fmt.format(x.max())}"
  return {
      "classifier weight norm, old classes": span(norm[old], "{:.2f}"),
      "classifier weight norm, the last phase's new classes": span(norm[new], "{:.2f}"),
      "weight norm, std / mean over all classes": f"{norm.std() / norm.mean():.2f}",
      "weight norm against arrival order, old classes (Pearson r)":
          f"{np.corrcoef(arrival[old], norm[old])[0, 1]:.2f}".replace("-", "−"),
      "Φ in the last phase, old classes": span(phi[old], "{:.0f}"),
      "Φ in the last phase, new classes": span(phi[new], "{:.0f}"),
      "forgetting against lost fraction R_c / N_c, Pearson r": f"{pearson:.2f}",
      "forgetting against lost fraction, Spearman ρ": f"{spearman:.2f}",
      "fitted slope, points per unit of lost fraction": f"{slope:.1f}",
      f"mean forgetting, the {none_lost.sum()} classes that lost nothing (N_c ≤ 20)":
          f"{forget[none_lost].mean():.1f}",
      f"mean forgetting, the {most_lost.sum()} classes that lost ≥ 80 % of their data":
          f"{forget[most_lost].mean():.1f}",
  }


def test_diagnostics_table_is_computed_from_the_runs():
  header, rows = table("RESULTS.md", "after the last phase")
  assert "dgr_s0" in header[1] and "finetune_s0" in header[2]
  expected = {"DGR": _diagnostics_rows(_diagnostics("dgr")),
              "fine-tuning": _diagnostics_rows(_diagnostics("finetune"))}
  shown = rows_by_label(rows)
  assert sorted(shown) == sorted(expected["DGR"])
  for label, row in shown.items():
    assert row[1:] == [expected["DGR"][label], expected["fine-tuning"][label]], label


def _bench_runs(name: str) -> dict:
  return {run["label"]: run["record"] for run in _load(name)["runs"]}


def _img_s(x: float) -> str:
  return f"{round(x):,}"


def test_step_table_is_the_h200_record():
  runs = _bench_runs("bench_h200_resnet32_fp32_7296f3a.json")
  plain = runs["7296f3a, all step kinds"]["steps"]
  buffers = runs["7296f3a, all step kinds, XLA_FLAGS=--xla_gpu_enable_command_buffer="
                 "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"]["steps"]
  header, rows = table("BENCHMARKS.md", "step (`bench_h200_resnet32_fp32_7296f3a.json`)")
  assert [r[0] for r in rows] == ["plain", "gr", "plain_teacher", "dgr"]
  for kind, img_s, compile_s, with_buffers in rows:
    assert img_s == _img_s(plain[kind]["images_per_s"]), kind
    assert compile_s == f"{plain[kind]['compile_and_first_epoch_s']:.1f} s", kind
    assert with_buffers == _img_s(buffers[kind]["images_per_s"]), kind


def test_protocol_time_tables_are_the_h200_records():
  records = {name: json.loads((RESULTS / name).read_text()) for name in
             ("protocol_time_h200_lfs20_73dba72.json", "protocol_time_h200_a05cc37.json")}
  cold_fp32 = next(r for r in records["protocol_time_h200_lfs20_73dba72.json"]["runs"]
                   if (r["call"], r["run"]) == (3, "full_cold"))
  current = {r["run"]: r for r in records["protocol_time_h200_a05cc37.json"]["runs"]}
  runs = [cold_fp32] + [current[name] for name in (
      "full_warm", "bf16_cold", "bf16_warm", "lfh_fp32_cold", "lfh_fp32_warm", "lfh_bf16_cold",
      "lfh_bf16_warm")]
  _, rows = table("BENCHMARKS.md", "protocol run")
  assert len(rows) == len(runs) + 1
  for row, run in zip(rows, runs):
    record = records[row[6].strip("`")]
    assert run in record["runs"], row
    lfs = run.get("setting", "lfs20") == "lfs20"
    assert row[0].startswith("LFS 20 × 5" if lfs else "LFH 50 + 5 × 10"), row
    assert run["dtype"] in row[0], row
    assert row[1] == run["compilation_cache"].split(" ")[0], row
    assert row[2] == f"{run['process_s']:.1f} s", row
    assert row[3] == f"{run['wall_time_s']:.1f} s", row
    assert row[4] == f"{run['average_incremental_accuracy']:.2f}", row
    reference = record["reference_code_s"]["estimate"]
    assert row[5] == (f"{reference / run['process_s']:.1f}×" if lfs else "—"), row
  assert rows[-1][2] == f"≈ {reference:,} s"
  header, parts = table("BENCHMARKS.md", "part, seconds")
  assert len(header) == len(runs) + 1
  keys = {"training calls": "train", "waiting for the epoch programs to compile": "compile_wait",
          "phase ends": "phase_end", "checkpoints": "checkpoint",
          "phase data onto the device": "phase_data", "the rest of the loop": "other"}
  for row in parts:
    label = row[0].split(":")[0]
    for cell, run in zip(row[1:], runs):
      if label in keys:
        assert float(cell) == run["time_split_s"][keys[label]], (label, cell)
      elif label == "outside the loop":
        assert float(cell) == pytest.approx(run["process_s"] - run["wall_time_s"], abs=0.05)
      else:
        assert label == "process" and float(cell) == run["process_s"]
  for i, run in enumerate(runs):
    assert sum(float(row[i + 1]) for row in parts[:-1]) == pytest.approx(run["process_s"], abs=0.4)
  readme = " ".join(_text("README.md").split())  # its wall times are those runs', rounded
  for run in runs[:2] + [runs[3], runs[4], runs[5]]:
    assert f"{run['process_s']:.0f} s" in readme, run["run"]


def test_older_step_table_is_the_h100_records():
  _, rows = table("BENCHMARKS.md", "step, H100")
  for label, img_s, cited in rows:
    kind = label.rsplit(", ", 1)[1]
    assert img_s == _img_s(_load(cited.strip("`"))["steps"][kind]["images_per_s"]), label


def test_kernel_table_is_the_h200_profile():
  profile = _bench_runs("bench_h200_resnet32_fp32_7296f3a.json")["7296f3a"]["steps"]["dgr"]["profile"]
  groups = {"convolutions": ["convolution (cuDNN)"], "reductions": ["reduction fusion"],
            "elementwise fusions": ["elementwise fusion"],
            "copies": ["copy/memset", "matmul (cuBLAS)", "other"],
            "all": list(profile["categories"])}
  _, rows = table("BENCHMARKS.md", "kernels of the DGR step")
  assert len(rows) == len(groups)
  for row, names in zip(rows, groups.values()):
    cats = [profile["categories"][n] for n in names]
    assert row[1] == f"{sum(c['ms_per_step'] for c in cats):.2f}", row
    assert row[2] == f"{sum(c['kernels_per_step'] for c in cats):.0f}", row
    assert row[3] == f"{100 * sum(c['fraction_of_busy'] for c in cats):.0f} %", row
  assert rows[-1][1] == f"{profile['busy_ms_per_step']:.2f}"


def test_memory_table_is_the_records():
  _, rows = table("BENCHMARKS.md", "what")
  for row in rows:
    gib = _load(row[2].strip("`"))
    gib = gib["runs"][0]["record"] if "runs" in gib else gib
    assert row[1] == f"{gib['peak_memory_gib']:.2g} GiB", row


def test_refactor_check_tables_are_the_records():
  note = "docs/notes/2026-12-h200-refactor-check.md"
  header, rows = table(note, "run (`bench_h200_resnet32_fp32_7296f3a.json`)")
  runs = _bench_runs("bench_h200_resnet32_fp32_7296f3a.json")
  assert sorted(rows_by_label(rows)) == sorted(runs)
  for label, row in rows_by_label(rows).items():
    dgr = runs[label]["steps"]["dgr"]
    p = dgr["profile"]
    assert row[1:] == [_img_s(dgr["images_per_s"]), f"{p['busy_ms_per_step']:.2f}",
                       f"{p['kernels_per_step']:.0f}", f"{p['busy_fraction']:.2f}"], label
  header, rows = table(note, "step")
  old, new = (_load(c.strip("`")) for c in header[1:3])
  for row in rows:
    kind = row[0].split()[0]
    a, b = old["steps"][kind]["images_per_s"], new["steps"][kind]["images_per_s"]
    assert row[1].split()[0] == _img_s(a) and row[2].split()[0] == _img_s(b), row
    assert row[3].replace("−", "-") == f"{100 * (b / a - 1):.1f} %", row
  check = _load("h200_phase0_check_7296f3a_vs_2f211a5.json")
  _, rows = table(note, "check")
  shown = rows_by_label(rows)
  for column, commit in ((1, "7296f3a"), (2, "2f211a5")):
    phase0, full = check["phase0_summary"][commit], check["full_seed0"][commit]
    accs = list(check["phase0_accuracy_by_seed"][commit].values())
    assert phase0["n"] == 13
    _close(shown["phase-0 accuracy, mean ± std over 13 seeds"][column], phase0["mean"],
           phase0["std"], where=commit)
    assert shown["phase-0 accuracy, range"][column] == f"{min(accs):.1f}–{max(accs):.1f}"
    _close(shown["full seed-0 run: AIA"][column], full["average_incremental_accuracy"])
    _close(shown["full seed-0 run: last accuracy"][column], full["last_accuracy"])
    _close(shown["full seed-0 run: phase-0 accuracy"][column], full["phase0_accuracy"])


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


_PROCESS_WORDS = re.compile(
    r"\b(sessions?|device tool|device time|issue \d+|budget|withheld|throwaway|call limit)\b", re.I)


@pytest.mark.parametrize("doc", DOCS + ["README.md", "docs/usage.md", "docs/multi_host.md"])
def test_docs_speak_of_the_code_not_of_how_it_was_built(doc):
  found = sorted(set(m.group(0) for m in _PROCESS_WORDS.finditer(_text(doc))))
  assert not found, f"{doc}: {found}"


@pytest.mark.parametrize("doc", ["RESULTS.md", "BENCHMARKS.md"])
def test_reference_pages_name_no_commits_outside_file_names(doc):
  text = _CITED.sub("", _text(doc))
  hashes = sorted(set(re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", text)))
  assert not hashes, f"{doc} names commits in its prose: {hashes}"
