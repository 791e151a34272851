"""The review as JUnit XML, so that CI shows each rule on each property as one test case."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from propscope.review.results import ReviewResult

__all__ = ["render_junit"]


def render_junit(result: ReviewResult) -> str:
    """One test suite with a test case per rule outcome; a failed rule is a ``<failure>``."""
    counts = {
        "tests": str(len(result.outcomes)),
        "failures": str(len(result.failures)),
        "errors": "0",
        "time": f"{result.seconds if math.isfinite(result.seconds) else 0.0:.3f}",
    }
    suites = ET.Element("testsuites", name="propscope review", **counts)
    suite = ET.SubElement(suites, "testsuite", name=f"propscope review: {result.title}", **counts)
    for outcome in result.outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"propscope.review.{outcome.property_name}",
            name=outcome.name,
            time="0",
        )
        if not outcome.passed:
            failure = ET.SubElement(case, "failure", message=outcome.message, type=outcome.rule)
            failure.text = "\n".join(
                [outcome.message, *(f"{key}: {value}" for key, value in outcome.details.items())]
            )
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True).decode("utf-8") + "\n"
