"""README's result tables are generated from benchmarks/results (issue 25: a typed table went
stale). The first test fails whenever README.md differs from what the generator writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import readme_tables as rt

ROOT = Path(__file__).resolve().parents[1]

RESULT = """# Plan

intro | not a table

## Models

| model | options | peak GiB | tokens/s |
|---|---|---:|---:|
| gpt | bf16 | 8.2 (22) | 107,272 |
| moe | bf16 | 7.0 (22) | 137,684 |

trailing text
"""


def test_readme_tables_are_what_the_results_files_say():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- table from ") >= 4  # the recipe, CPU benchmark and both plans
    assert readme.count("<!-- table from ") == readme.count("<!-- end table -->")
    assert rt.render(readme) == readme, (
        "README.md's tables differ from benchmarks/results: run python -m benchmarks.readme_tables")


def _readme(spec: str, body: str = "| stale |\n|---|\n| 14.9 |\n") -> str:
    return f"# Title\n\ntext\n\n<!-- table {spec} -->\n{body}<!-- end table -->\n\nafter\n"


def test_a_stale_table_is_rewritten_with_every_column(tmp_path):
    (tmp_path / "r.md").write_text(RESULT)
    new = rt.render(_readme("from r.md"), tmp_path)
    assert "14.9" not in new and new.startswith("# Title\n\ntext\n\n") and new.endswith("\nafter\n")
    assert ("| model | options | peak GiB | tokens/s |\n| --- | --- | ---: | ---: |\n"
            "| gpt | bf16 | 8.2 (22) | 107,272 |\n| moe | bf16 | 7.0 (22) | 137,684 |\n"
            "<!-- end table -->") in new
    assert rt.render(new, tmp_path) == new  # generated once, it stays


def test_a_new_column_in_the_results_appears(tmp_path):
    (tmp_path / "r.md").write_text(RESULT)
    readme = rt.render(_readme("from r.md; drop: options"), tmp_path)
    assert "| model | peak GiB | tokens/s |" in readme and "bf16" not in readme
    (tmp_path / "r.md").write_text(RESULT.replace("| tokens/s |", "| tokens/s | MFU |")
                                   .replace("---:|\n", "---:|---:|\n", 1)
                                   .replace("107,272 |", "107,272 | 52% |")
                                   .replace("137,684 |", "137,684 | 32% |"))
    again = rt.render(readme, tmp_path)
    assert "| model | peak GiB | tokens/s | MFU |" in again
    assert "| gpt | 8.2 (22) | 107,272 | 52% |" in again


def test_keep_section_and_several_runs(tmp_path):
    (tmp_path / "a.md").write_text(RESULT)
    (tmp_path / "b.md").write_text(RESULT.replace("8.2", "9.9"))
    new = rt.render(_readme("from a.md, b.md; section: Models; run: a, b; keep: model, peak GiB"),
                    tmp_path)
    assert ("| run | model | peak GiB |\n| --- | --- | ---: |\n| a | gpt | 8.2 (22) |\n"
            "| a | moe | 7.0 (22) |\n| b | gpt | 9.9 (22) |\n") in new


@pytest.mark.parametrize("spec,message", [
    ("from missing.md", "does not exist"),
    ("from r.md; keep: model, nope", "no column"),
    ("from r.md; section: Nowhere", "no heading"),
    ("from r.md; colour: red", "unknown key"),
    ("from r.md, r.md; run: one", "run labels"),
])
def test_bad_blocks_are_named(tmp_path, spec, message):
    (tmp_path / "r.md").write_text(RESULT)
    with pytest.raises(rt.TableError, match=message):
        rt.render(_readme(spec), tmp_path)


def test_check_exits_1_on_a_stale_readme_and_writes_nothing(tmp_path, capsys):
    stale = _readme("from benchmarks/results/plan-rtx4090.md")
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert rt.main(["--readme", str(path), "--check"]) == 1 and path.read_text() == stale
    assert rt.main(["--readme", str(path)]) == 0 and path.read_text() != stale
    assert rt.main(["--readme", str(path), "--check"]) == 0
