"""What loading the CLI imports: nothing that starts metrics before `serve` has set them up.

prometheus_client picks its value store when it is imported, from PROMETHEUS_MULTIPROC_DIR; `serve`
drops an inherited one before that (proxy/cli/__init__.py), so no command module may import it (or
proxy.delivery, proxy.metrics, which do) at the top. A command that needs them imports them inside.
"""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_cli_imports_no_metrics_library() -> None:
    code = "import sys, proxy.cli; print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'proxy.metrics', 'proxy.delivery'))))"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert finished.stdout.strip() == "[]", finished.stdout
