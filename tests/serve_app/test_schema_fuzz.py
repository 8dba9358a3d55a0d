"""Schemathesis over the app's OpenAPI schema, against the real app: whatever a client sends, no
answer is a 5xx. The command, runnable against any deployment (a key in CHATSERVE_KEY):

    schemathesis run http://127.0.0.1:8000/openapi.json --checks not_a_server_error \\
        --header "Authorization: Bearer $CHATSERVE_KEY" --max-examples 25 --workers 1
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import as_admin

pytestmark = pytest.mark.serve
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_no_request_the_schema_allows_gets_a_5xx(base_url, tmp_path):
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{base_url}/openapi.json", "--checks", "not_a_server_error",
         "--header", f"Authorization: {as_admin()['Authorization']}", "--max-examples", "20", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--max-time", "120",
         "--suppress-health-check", "all", "--no-color"],
        capture_output=True, text=True, timeout=420, cwd=tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "Server error" not in report and re.search(r"\d+ generated, \d+ passed", report), report[-3000:]
