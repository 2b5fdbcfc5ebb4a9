"""`shoal run` gives an unmodified torchrun script exactly torchrun's environment."""

from __future__ import annotations

import json
import sys

from tests.helpers.cli import finish, start_shoal
from tests.helpers.procs import MARK, Processes, child_env

DUMP = """
import json, os, sys, torch
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"env": dict(os.environ), "threads": torch.get_num_threads()}, f)
"""

PER_RUN = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", MARK}
"""Values that differ between any two runs of the same launcher (and the harness's mark on each process)."""


def test_shoal_run_gives_a_script_torchruns_environment(tmp_path):
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}
    seen = {}
    with Processes() as procs:
        for launcher in ("torchrun", "shoal"):
            out = tmp_path / launcher
            out.mkdir()
            if launcher == "torchrun":
                argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                proc = procs.start([*argv, str(script), str(out)], timeout=120, env=env)
            else:
                proc = start_shoal(procs, "run", "-n", 2, script, out, timeout=120, env=env)
            done = finish(proc)
            assert done.returncode == 0, done.stderr
            seen[launcher] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in range(2):
        ours, theirs = seen["shoal"][rank], seen["torchrun"][rank]
        added = {k for k in ours["env"] if k.startswith("SHOAL_")}
        assert set(ours["env"]) - added == set(theirs["env"]), "shoal run sets or drops a variable torchrun does not"
        differ = {k for k in theirs["env"] if ours["env"][k] != theirs["env"][k]}
        assert differ <= PER_RUN, {k: (ours["env"][k], theirs["env"][k]) for k in differ - PER_RUN}
        assert ours["env"]["OMP_NUM_THREADS"] == "1" and ours["threads"] == theirs["threads"] == 1
        assert added <= {"SHOAL_LAUNCHED", "SHOAL_JOB_KEY", "SHOAL_THREADS_DEFAULTED", "SHOAL_RECOVERY_DIR"}, added
