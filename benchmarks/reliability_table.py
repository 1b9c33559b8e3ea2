"""The README's "Reliability" table, produced from a run of the fault, bad-input and security tests.

    python benchmarks/reliability_table.py                          # -> benchmarks/results/reliability.md
    python benchmarks/reliability_table.py --output /tmp/r.md -- -k kill9     # pytest arguments after --

Runs `pytest tests/test_faults.py tests/test_bad_input.py tests/test_security.py` with a JUnit XML
report and turns every test case into one row: what was tried (the test's docstring first line, plus
the case of a parametrized test), the outcome (passed, FAILED, skipped, error) and what the test
observed and asserted (the message it recorded with `record_property("observed", ...)`), or the
failure reason. Nothing in the table is written by hand. Exits with pytest's status, so a failing
case fails the command too, after the table is written.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = {
    "tests/test_faults.py": "Faults survived",
    "tests/test_bad_input.py": "Bad input refused",
    "tests/test_security.py": "Security",
}
TMP_PATH = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; everything after `--` goes to pytest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/reliability.md"), help="markdown file")
    parser.add_argument("--junit-xml", default=None, help="keep pytest's JUnit XML here (default: a temp file)")
    args = parser.parse_args(argv)
    args.pytest_args = pytest_args
    return args


def docstring_summaries(test_file: Path) -> dict[str, str]:
    """{test function name: first line of its docstring} for one test module."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    summaries = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node) or node.name.removeprefix("test_").replace("_", " ")
            summaries[node.name] = doc.strip().splitlines()[0].rstrip(".")
    return summaries


def run_tests(junit_xml: Path, pytest_args: list[str]) -> tuple[int, float]:
    """Run the three test modules (output streams to the console); return (exit status, seconds)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={junit_xml}",
        *TEST_FILES,
        *pytest_args,
    ]
    start = time.perf_counter()
    status = subprocess.run(command, cwd=REPO, check=False).returncode
    return status, time.perf_counter() - start


def cell(text: str, limit: int = 400) -> str:
    """One markdown table cell: temp paths shortened, one line, pipes escaped, length capped."""
    text = TMP_PATH.sub("<tmp>/", str(text))
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def read_cases(junit_xml: Path) -> list[dict]:
    """Every <testcase> as {"file", "name", "case", "outcome", "observed", "seconds"}."""
    cases = []
    for testcase in ET.parse(junit_xml).getroot().iter("testcase"):
        module = testcase.get("classname", "").replace(".", "/") + ".py"
        name, _, case = testcase.get("name", "").partition("[")
        observed = next((p.get("value", "") for p in testcase.iter("property") if p.get("name") == "observed"), "")
        outcome = "passed"
        for tag, label in (("failure", "**FAILED**"), ("error", "**error**"), ("skipped", "skipped")):
            problem = testcase.find(tag)
            if problem is not None:
                outcome = label
                reason = problem.get("message") or problem.text or ""
                observed = reason + (f" (observed: {observed})" if observed else "")
                break
        cases.append(
            {
                "file": module,
                "name": name,
                "case": case.removesuffix("]"),
                "outcome": outcome,
                "observed": observed,
                "seconds": float(testcase.get("time", 0)),
            }
        )
    return cases


def render(cases: list[dict], status: int, seconds: float) -> str:
    """The markdown section: header, totals and one table per test module."""
    counts = {
        label: sum(c["outcome"] == label for c in cases) for label in ("passed", "**FAILED**", "**error**", "skipped")
    }
    totals = ", ".join(f"{n} {label.strip('*').lower()}" for label, n in counts.items() if n)
    out = [
        "## Reliability",
        "",
        "Each row is one fault or bad input tried by the test suite, with the outcome of the last run and the "
        "message the test observed and asserted. Produced by `python benchmarks/reliability_table.py` "
        "(not written by hand); rerun it to refresh.",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, torch {importlib.metadata.version('torch')}, "
        f"{platform.machine()} CPU; {totals} in {seconds:.0f} s (pytest exit status {status}).",
    ]
    for test_file, title in TEST_FILES.items():
        summaries = docstring_summaries(REPO / test_file)
        rows = [c for c in cases if c["file"] == test_file]
        if not rows:
            continue
        out += ["", f"### {title} (`{test_file}`)", "", "| Tried | Outcome | Observed and asserted |", "|---|---|---|"]
        for row in rows:
            tried = summaries.get(row["name"], row["name"]) + (f": {row['case']}" if row["case"] else "")
            out.append(f"| {cell(tried, 200)} | {row['outcome']} | {cell(row['observed'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the tests, write the table; return pytest's exit status."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit_xml = Path(args.junit_xml or Path(tmp) / "reliability.xml")
        status, seconds = run_tests(junit_xml, args.pytest_args)
        if not junit_xml.exists():
            print(f"pytest wrote no report (exit status {status}); no table written", file=sys.stderr)
            return status or 1
        cases = read_cases(junit_xml)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(cases, status, seconds))
    print(f"wrote {output} ({len(cases)} cases, pytest exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
