"""Cold start: `python -m flgengine generate` on the default model against `python -c "import torch"`,
the difference of the medians of a few runs in one session (the CLI's own cost: importing
flgengine, loading the bundle, 4 steps, writing the GIF)."""

import statistics
import subprocess
import sys
import time


def _seconds(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_cli_cold_start_over_import_torch(benchmark, tmp_path):
    torch_only = _seconds([sys.executable, "-c", "import torch"])
    cli = _seconds([sys.executable, "-m", "flgengine", "generate", "a red circle moving left", "-o",
                    str(tmp_path / "v.gif"), "--quiet"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"import_torch_s": torch_only, "cli_generate_s": cli, "difference_s": cli - torch_only})
    print(f"\ncold start: `import torch` {torch_only:.2f} s, `python -m flgengine generate` {cli:.2f} s: "
          f"{cli - torch_only:.2f} s more")
