"""Run a Triton test file under the interpreter in a child pytest.

TRITON_INTERPRET must be set before triton is imported, and the main test process has usually
imported it already, so interpreter suites run in a subprocess with TRITON_INTERPRET=1 and
LORAMIX_BACKEND=triton; the child's output is shown when it fails."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_file_under_interpreter(path: str, timeout: int = 900) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", LORAMIX_BACKEND="triton",
               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          path], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter run failed (rc={res.returncode}):\n{tail}"
    return tail.splitlines()[-1] if tail else ""
