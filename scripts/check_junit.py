"""Fail unless a junit report ran exactly the expected number of tests, none skipped."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main() -> int:
    path, expected = sys.argv[1], int(sys.argv[2])
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, "no testsuite in report"
    tests = int(suite.get("tests", 0))
    skipped = int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    print(f"e2e: {tests} run, {skipped} skipped, {failed} failed, {expected} expected")
    if expected == 0 or tests != expected or skipped or failed:
        print("e2e tier incomplete: every e2e test must run and pass on this machine kind",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
