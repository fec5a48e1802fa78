"""Rendering of ``check`` results: table, JSON, Markdown (for a pull-request comment), JUnit XML."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import markdown_table
from bnscope.report.sink import renders
from bnscope.report.stats import CAUSE_TITLE, diagnosis_lines

if TYPE_CHECKING:
    from bnscope.workflows.check.result import CheckResult, CheckResults


def _summary(result: CheckResult) -> str:
    n, failed = len(result.results), len(result.failures)
    return f"{'PASSED' if result.passed else 'FAILED'}: {n - failed}/{n} checks passed, {failed} failed"


@renders("CheckResult", "table")
def _check_table(result: CheckResult, console: Console) -> None:
    """Failures in full, then one line per rule (JSON/JUnit keep every rule x layer)."""
    table = Table(header_style="bold", title=f"bnscope check {result.model}")
    for col in ("rule", "layer", "result", "detail"):
        table.add_column(col, overflow="fold")
    for r in result.failures:
        table.add_row(r.rule, r.layer or "(model)", Text("FAIL", style="bold red"), r.message)
    for rule in dict.fromkeys(r.rule for r in result.results):
        mine = [r for r in result.results if r.rule == rule]
        passed = sum(r.passed for r in mine)
        if passed:
            detail = mine[0].message if len(mine) == 1 else f"{passed}/{len(mine)} layers pass"
            table.add_row(
                rule,
                "(all)" if len(mine) > 1 else (mine[0].layer or "(model)"),
                Text("pass", style="green") if passed == len(mine) else Text("partly", style="yellow"),
                detail,
            )
    console.print(table)
    for rule, why in result.not_run.items():
        console.print(f"not run: {rule} ({why})", highlight=False)
    for line in _diagnosis(result):
        console.print(line, highlight=False)
    console.print(Text(_summary(result), style="bold green" if result.passed else "bold red"))


def _diagnosis(result: CheckResult) -> list[str]:
    return diagnosis_lines(result.stats) if result.stats is not None and result.stats.diagnosis else []


@renders("CheckResult", "markdown")
def check_markdown(result: CheckResult) -> str:
    icon = ":white_check_mark:" if result.passed else ":x:"
    failed = [[r.rule, f"`{r.layer or '(model)'}`", r.message] for r in result.failures]
    parts = [f"## {icon} bnscope check `{result.model}`\n", _summary(result) + "\n"]
    if failed:
        parts.append(markdown_table(["rule", "layer", "detail"], failed))
    passed_rules = sorted({r.rule for r in result.results if r.passed} - {r.rule for r in result.failures})
    if passed_rules:
        parts.append(f"\nPassed rules: {', '.join(passed_rules)}")
    parts += [f"\nNot run: {rule} ({why})" for rule, why in result.not_run.items()]
    if _diagnosis(result):
        parts += ["", *_diagnosis(result)]
    return "\n".join(parts)


@renders("CheckResult", "junit")
def check_junit(result: CheckResult) -> str:
    """One test case per rule and layer, so CI systems show the check natively."""
    return _junit_document([_junit_suite(result, name="bnscope check")])


def _junit_suite(result: CheckResult, name: str):
    import xml.etree.ElementTree as ET  # on use: the CLI imports this module for its --format choices

    suite = ET.Element(
        "testsuite",
        name=name,
        tests=str(len(result.results) + len(result.not_run)),
        failures=str(len(result.failures)),
        errors="0",
        skipped=str(len(result.not_run)),
    )
    for r in result.results:
        case = ET.SubElement(suite, "testcase", classname=f"bnscope.{r.rule}", name=r.layer or "model")
        if not r.passed:
            cause, text = _layer_diagnosis(result, r.layer)
            message = f"{r.message}; cause: {cause}" if cause else r.message
            ET.SubElement(case, "failure", message=message, type=r.rule).text = "\n".join([r.message, *text])
    for rule, why in result.not_run.items():
        case = ET.SubElement(suite, "testcase", classname=f"bnscope.{rule}", name="model")
        ET.SubElement(case, "skipped", message=why)
    return suite


def _layer_diagnosis(result: CheckResult, layer: str | None) -> tuple[str | None, list[str]]:
    """The diagnosis's word on one layer: its cause (or "after X": it inherits X's), and the lines
    that explain it and say what to do, as the table and markdown give them."""
    if layer is None or result.stats is None:
        return None, []
    cause = result.stats.causes().get(layer)
    for finding in result.stats.diagnosis:
        if layer in finding.layers or layer in finding.evidence.get("downstream", ()):
            title = CAUSE_TITLE.get(finding.cause, finding.cause)
            return cause, [f"diagnosis: {title}: {finding.message}", f"what to do: {finding.action}"]
    return cause, []


def _junit_document(suites: list) -> str:
    import xml.etree.ElementTree as ET

    tests, failures = (str(sum(int(s.get(key)) for s in suites)) for key in ("tests", "failures"))
    root = ET.Element("testsuites", name="bnscope", tests=tests, failures=failures)
    root.extend(suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


# Several models (check MODEL...): one result each, in the single-model forms, and the count.


def _models_summary(results: CheckResults) -> str:
    failed = results.failed
    if failed:
        return f"FAILED: {len(failed)} of {len(results.results)} models failed ({', '.join(failed)})"
    return f"PASSED: all {len(results.results)} models passed"


@renders("CheckResults", "table")
def _checks_table(results: CheckResults, console: Console) -> None:
    for i, result in enumerate(results.results):
        if i:
            console.print()
        _check_table(result, console)
    console.print(Text(_models_summary(results), style="bold green" if results.passed else "bold red"))


@renders("CheckResults", "markdown")
def _checks_markdown(results: CheckResults) -> str:
    return "\n\n".join([_models_summary(results), *(check_markdown(r) for r in results.results)])


@renders("CheckResults", "junit")
def _checks_junit(results: CheckResults) -> str:
    return _junit_document([_junit_suite(r, name=f"bnscope check {r.model}") for r in results.results])
