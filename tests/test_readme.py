"""The README's opening example runs as written and prints what its comment says."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_opening_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)[1]  # the first Python block
    assert "ttscale.beam_search" in code
    expected = re.search(r"print\(results\[0\]\.answer\)\s+# (\S+)", code)[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected
