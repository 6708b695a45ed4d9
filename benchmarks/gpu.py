"""`make bench-gpu`: the side-by-side benchmark on CUDA (float32 and bfloat16) and the example findings on CUDA, in one
script that fits 10 minutes on one GPU; writes benchmarks/results-gpu.json (entries in the results.json format).

Without CUDA it writes nothing and exits 2 with one line saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "make bench-gpu: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing run, "
            "benchmarks/results-gpu.json left as it is. Run it on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    from side_by_side import scaling, side_by_side, write_entries

    start = time.perf_counter()
    entries = side_by_side("cuda", 5, torch.float32, suffix="_cuda_fp32")
    entries += side_by_side("cuda", 5, torch.bfloat16, suffix="_cuda_bf16")
    entries += [dict(e, name=e["name"] + "_cuda") for e in scaling("cuda")]
    t = time.perf_counter()
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(HERE.parent / "examples"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--nnsight-device",
            "cuda",
        ],
        cwd=HERE.parent,
    ).returncode
    entries.append(
        {
            "name": "examples_on_cuda",
            "value": rc,
            "unit": "exit code",
            "target": "== 0",
            "passed": rc == 0,
            "detail": f"pytest examples/ --nnsight-device cuda in {time.perf_counter() - t:.1f} s ({torch.cuda.get_device_name(0)})",
        }
    )
    path = HERE / "results-gpu.json"
    rc = write_entries(entries, path)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
