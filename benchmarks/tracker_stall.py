"""A tracking server that stops answering mid-run: how much of a `--time-budget` run trains.

A local stand-in for MLflow's REST server answers the calls `fastclr pretrain --log mlflow` makes
(experiment, run, parameters, artifacts) and the first `--answers` metric batches, then holds
every later request open without a reply, as a server that hung does. Each of `--repos` (checkouts
of fastclr, e.g. a git worktree of an earlier commit) runs `pretrain --data mnist --time-budget B
--log mlflow` against it, alternating, `--rounds` times, in a fresh process each. Reported: the
last step in metrics.jsonl, the training seconds the run printed, and the whole command's seconds
(its end waits for the tracker, by design, within bounds). Artifacts go to a temporary folder.

    python benchmarks/tracker_stall.py --repos /tmp/before . --budget 0.5 --rounds 2 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import describe, record


def stalling_server(answers: int, artifacts: Path) -> tuple[ThreadingHTTPServer, threading.Event]:
    """An MLflow REST stand-in on a free local port; it stops answering after `answers` metric
    batches (parameters are logged in a batch of their own, which counts as one). Set the event
    to let the held requests go."""
    release, batches = threading.Event(), [0]
    location = artifacts.as_uri()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path.split("?")[0]
            if path.endswith("runs/log-batch"):
                batches[0] += 1
            if batches[0] > answers:
                release.wait()  # a server that hung: the connection stays open, no reply
                return
            experiment = {"experiment_id": "1", "name": "fastclr", "artifact_location": location,
                          "lifecycle_stage": "active"}
            if "experiments/get" in path:
                return self._reply({"experiment": experiment})
            if path.endswith("runs/create") or path.endswith("runs/get"):
                rid = uuid.uuid4().hex
                return self._reply({"run": {"info": {"run_id": rid, "run_uuid": rid, "experiment_id": "1",
                                                     "status": "RUNNING", "artifact_uri": f"{location}/{rid}",
                                                     "lifecycle_stage": "active"}, "data": {}}})
            return self._reply({})

        do_GET = do_POST = do_PATCH = do_PUT = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, release


def one_run(repo: Path, budget: float, answers: int, scratch: Path) -> dict[str, Any]:
    """`pretrain` from `repo` against a stalling server; its steps and seconds."""
    server, release = stalling_server(answers, scratch / "artifacts")
    run = scratch / f"run-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PYTHONPATH=str(repo.resolve()),
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{server.server_address[1]}")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--time-budget", str(budget),
                           "--log", "mlflow", "--log-every", "2", "--probe", "false", "--quiet", str(run)],
                          env=env, capture_output=True, text=True, timeout=900)
    whole = time.perf_counter() - t0
    release.set()
    server.shutdown()
    if done.returncode:
        raise SystemExit(f"{repo}: pretrain exited {done.returncode}: {done.stderr.strip()[-500:]}")
    steps = max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())
    trained = re.search(r"trained (\d+) steps in (\d+) s", done.stdout + done.stderr)
    return {"last_step": steps, "train_seconds": int(trained.group(2)) if trained else None,
            "whole_seconds": round(whole, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", nargs="+", default=["."], help="checkouts of fastclr to compare, run alternately")
    p.add_argument("--budget", type=float, default=0.5, help="pretrain's --time-budget, minutes")
    p.add_argument("--answers", type=int, default=3, help="metric batches the server answers before it hangs (-1: it hangs from the first request)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="", help="also append each record to this JSONL file")
    args = p.parse_args()
    for repo in args.repos:
        if not (Path(repo) / "fastclr" / "__init__.py").is_file():
            p.error(f"--repos {repo}: not a checkout of fastclr (no fastclr/__init__.py there)")
    machine, command = describe(), " ".join([sys.executable, *sys.argv])
    with tempfile.TemporaryDirectory() as scratch:
        for rnd in range(1, args.rounds + 1):
            for repo in args.repos:
                rec = {"benchmark": "tracker_stall", "command": command, "machine": machine, "repo": repo,
                       "commit": _commit(Path(repo)), "round": rnd, "budget_min": args.budget,
                       **one_run(Path(repo), args.budget, args.answers, Path(scratch))}
                if args.out:
                    record(args.out, rec)
                else:
                    print(json.dumps(rec), flush=True)


def _commit(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
