"""Under `shoal run tests/workers/ticking.py SECONDS`: each rank prints `tick N` ten times a
second for SECONDS and ends: a job that runs while a test acts on its launcher or control plane."""

import sys
import time

import shoal


def main(seconds: float) -> None:
    rt = shoal.init()
    for n in range(int(seconds * 10)):
        print(f"tick {n} rank {rt.rank}", flush=True)
        time.sleep(0.1)
    shoal.shutdown()


if __name__ == "__main__":
    main(float(sys.argv[1]))
