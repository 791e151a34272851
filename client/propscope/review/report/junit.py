"""The review as JUnit XML, so that CI shows each rule on each property as one test case."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

from propscope.review.results import ReviewResult

__all__ = ["render_junit"]

# Characters XML 1.0 cannot hold, even escaped; ElementTree would write them and break the file.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def render_junit(result: ReviewResult) -> str:
    """One test suite with a test case per rule outcome; a failed rule is a ``<failure>``, an
    inconclusive one ``<skipped>`` (a ``<failure>`` of type inconclusive when the spec's
    fail_on_inconclusive is set): never a passed case."""
    failing = len(result.failures) + (
        len(result.inconclusive) if result.fail_on_inconclusive else 0
    )
    counts = {
        "tests": str(len(result.outcomes)),
        "failures": str(failing),
        "errors": "0",
        "skipped": str(0 if result.fail_on_inconclusive else len(result.inconclusive)),
        "time": f"{result.seconds if math.isfinite(result.seconds) else 0.0:.3f}",
    }
    suites = ET.Element("testsuites", name="propscope review", **counts)
    suite = ET.SubElement(
        suites, "testsuite", name=_xml_text(f"propscope review: {result.title}"), **counts
    )
    for outcome in result.outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_xml_text(f"propscope.review.{outcome.property_name}"),
            name=_xml_text(outcome.name),
            time="0",
        )
        if outcome.passed:
            continue
        failed = outcome.verdict == "failed"
        message = _xml_text(outcome.message if failed else f"inconclusive: {outcome.message}")
        if not failed and not result.fail_on_inconclusive:
            ET.SubElement(case, "skipped", message=message)
            continue
        failure = ET.SubElement(
            case, "failure", message=message, type=outcome.rule if failed else "inconclusive"
        )
        failure.text = _xml_text(
            "\n".join([message, *(f"{key}: {value}" for key, value in outcome.details.items())])
        )
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True).decode("utf-8") + "\n"
