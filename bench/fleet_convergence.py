"""A fleet of simulated devices polling the TUF repository over real HTTP: what each device
pulls, how fast the fleet converges, what the server and the clients spend.

nginx (Debian's `nginx-light`; `make nginx` installs it) runs as a child of this process with
its own configuration in a temporary folder: `127.0.0.1:<free port>`, the artifact store as
its root (so `/tuf/...` is the repository `publish_desired_state` writes), ETags, keep-alive,
and an access log of `$status $body_bytes_sent $bytes_sent $request_length $request`. It is
stopped by its pid (SIGTERM, then SIGKILL to its process group) at the end.

For each fleet size N, devices get the fleet file's groups in proportion to their sizes
(`pipelines.edge.simulator.assign_groups`); the bench model selects the android phones (55%).
The devices are split over `--processes` worker processes, each polling its share with
`--threads` threads at once. A device is a real `EdgeAgent` over a `TufDesiredState` with its
own folder (metadata cache, ETag cache, model files), under /dev/shm when it exists (the agent
fsyncs: a disk would measure the disk). A worker creates a device's agent, polls once, records
the figures and drops it, like a phone that restarts between polls: what a device keeps lives
in its folder. Phases per N:

1. cold start on the current release: rounds of one poll per device until every selected
   device runs it;
2. quiet poll: one more round (target: 1 request, a 304, at most 1 KB on the wire);
3. a new version released for real (`run_release`, which publishes the TUF repository after
   its commit; not timed);
4. update: rounds until every selected device runs it (target: timestamp, snapshot, targets,
   group document, artifact and signature bundle, nothing else; one artifact download).

Per device and phase: requests, wire bytes (headers included) and 304s from the device's
fetcher counters, artifact downloads from the agent; the access log counts the same requests
and bytes from the server's side (`$request_length + $bytes_sent`) and which files were asked
for. Per fleet: seconds to converge (rounds back to back, wall time); server requests per
second = access-log lines / the phase's seconds, which the simulated clients on the same cores
bound, so the CPU time of nginx (from /proc) and of the workers is reported beside it; client
memory per device = (sum over workers of their peak RSS while polling - their RSS before the
first device, after imports and one smoke inference) / (processes x threads, the devices in
flight at once); disk per device = apparent bytes of its folder after the update (TUF
metadata and caches, model files: the active version and the one before it).

Comparison row: Git per device (`GitDesiredState`: each device its own shallow clone of the
GitOps remote over file://, one device after another in this process; its bytes are the pack
files Git wrote, without the ref negotiation) at `--git-devices` (100).

    .venv/bin/python bench/fleet_convergence.py            # 1,000 and 10,000 devices (make bench, ~4 min)
    .venv/bin/python bench/fleet_convergence.py --devices 100000 --git-devices 0   # ~25 min, 2 cores

Releases live in `$EDGE_STATE_DIR/bench/fleet-state` (default `.edge-state`), which a later
run reuses; the figures go to `$EDGE_STATE_DIR/bench/fleet_convergence.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.settings import Settings, get_settings  # noqa: E402

MODEL = "fleet-bench"
SELECTOR = {"apexlogic.dev/device-class": "android-phone"}
MAX_ROUNDS = 5
QUIET_POLL_MAX_BYTES = 1024


# --- releases --------------------------------------------------------------------------------


def _spec(folder: Path, description: str) -> Path:
    """A tiny tabular spec (logistic regression on 400 rows) that targets android phones."""
    import numpy as np
    import pandas as pd
    import yaml

    rng = np.random.default_rng(0)
    rows = 400
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    pd.DataFrame({"x1": x1, "x2": x2, "colour": colour, "group": rng.choice(["a", "b"], size=rows),
                  "label": ((x1 + 0.5 * x2 + (colour == "red")) > 0.3).astype(int)}).to_csv(
        folder / "data.csv", index=False)
    spec = {
        "name": MODEL, "owner": "bench@example.com", "description": description,
        "data": {"source": "data.csv", "target": "label", "features": ["x1", "x2", "colour"],
                 "sensitiveFeatures": ["group"],
                 "validation": {"maxNullShare": 0.05, "minRows": 50, "ranges": {"x1": [-10, 10]}}},
        "training": {"framework": "sklearn", "estimator": "logistic_regression", "seed": 1},
        "export": {"opset": 17, "quantization": ["dynamic"], "accuracyBudget": 0.02},
        "finops": {"costCenter": "bench", "project": "fleet-bench", "monthlyBudgetUsd": 1000},
        "targets": [{"name": "phones", "selector": {"matchLabels": SELECTOR}}],
        "responsibleAI": {"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}},
    }
    path = folder / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _release(settings: Settings) -> str:
    """A real release of the bench spec (published to the TUF repository after its commit);
    each call changes the description, so a new version."""
    from pipelines.release import run_release

    folder = settings.state / "spec"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = run_release(_spec(folder, f"fleet convergence benchmark, released at {time.time_ns()}"), trigger="bench",
                          settings=settings)
    if summary.status != "released":
        raise SystemExit(f"the bench release was not released: {summary.reasons}")
    print(f"  released {MODEL} v{summary.model_version} in {time.perf_counter() - start:.1f} s (not counted)",
          flush=True)
    return summary.model_version


def _current_version(settings: Settings) -> str | None:
    from pipelines.release import latest_summary

    if not (settings.state / "gitops.git").exists():
        return None
    summary = latest_summary(MODEL, settings)
    return summary.model_version if summary and summary.status == "released" else None


def _published(settings: Settings) -> tuple[bytes, Path]:
    """The repository's trusted root, after publishing the GitOps tip (a no-op when current),
    and a published model file for the workers' warm-up."""
    from pipelines.edge.publish import ensure_repository, publish_desired_state

    report = publish_desired_state(settings)
    if report.refused:
        raise SystemExit(f"the desired state was not published: {report.refused}")
    models = sorted((settings.state / "artifacts" / settings.tuf_prefix / "targets").rglob("*.onnx"))
    if not models:
        raise SystemExit("the TUF repository has no model file")
    return ensure_repository(settings).trusted_root(), models[0]


# --- nginx -----------------------------------------------------------------------------------


def find_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not found:
        raise SystemExit("fleet_convergence: nginx not found (PATH or /usr/sbin/nginx); "
                         "`make nginx` installs Debian's nginx-light")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LOG_LINE = re.compile(r'^(\d{3}) (\d+) (\d+) (\d+) "(\S+) (\S+)[^"]*"$')
FILE_KINDS = ("root", "timestamp", "snapshot", "targets", "group", "artifact", "bundle", "other")


def file_kind(path: str) -> str:
    """Which TUF file a request path names."""
    name = path.rsplit("/", 1)[-1]
    if "/metadata/" in path:
        if name == "timestamp.json":
            return "timestamp"
        for kind in ("root", "snapshot"):
            if re.fullmatch(rf"\d+\.{kind}\.json", name):
                return kind
        return "targets" if re.fullmatch(r"\d+\.(targets|bins-[0-9a-f]+)\.json", name) else "other"
    if "/targets/groups/" in path:
        return "group"
    if name.endswith(".onnx"):
        return "artifact"
    return "bundle" if name.endswith(".sig") else "other"


class Nginx:
    """nginx as a child process (its own process group) serving `root` on 127.0.0.1."""

    def __init__(self, binary: str, root: Path, folder: Path):
        self.binary, self.root, self.folder = binary, root, folder
        self.port = _free_port()
        self.access_log = folder / "access.log"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        temp = "\n".join(f"    {kind}_temp_path {self.folder / 'temp' / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""{'user root;' if os.geteuid() == 0 else ''}
daemon off;
worker_processes auto;
pid {self.folder / 'nginx.pid'};
error_log {self.folder / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
    types {{ application/json json; }}
    default_type application/octet-stream;
    log_format counts '$status $body_bytes_sent $bytes_sent $request_length "$request"';
    access_log {self.access_log} counts;
{temp}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
    keepalive_requests 1000;
    server_tokens off;
    etag on;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {self.root};
        location /tuf/ {{ }}
        location / {{ return 404; }}
    }}
}}
"""

    def start(self) -> None:
        (self.folder / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(self.config())
        with open(self.folder / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [self.binary, "-p", str(self.folder), "-c", str(conf), "-e", str(self.folder / "error.log")],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        errors = " ".join(((self.folder / "error.log").read_text(errors="replace") if
                           (self.folder / "error.log").exists() else "").split())[-400:]
        raise SystemExit(f"nginx did not start on 127.0.0.1:{self.port}: {errors or 'no error logged'}")

    def stop(self) -> None:
        """SIGTERM to our nginx master, SIGKILL to its process group if it lingers; check it is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for _ in range(100):  # the workers leave after the master; the group is then empty
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.2)
            os.killpg(process.pid, 0)
            print(f"warning: nginx process group {process.pid} still exists", file=sys.stderr)
        except ProcessLookupError:
            pass

    def cpu_seconds(self) -> float:
        """CPU time of nginx's master and workers (its process group) so far, from /proc."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if self.process is not None and int(fields[2]) == self.process.pid:  # fields[2]: process group
                total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
        return total / os.sysconf("SC_CLK_TCK")

    @property
    def url(self) -> str:
        return f"tuf+http://127.0.0.1:{self.port}/tuf"

    def offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def counts(self, start: int) -> dict:
        """Requests, statuses, bytes and files asked for in the access log since `start`."""
        time.sleep(0.1)  # nginx logs a request just after its last byte went out
        statuses: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        kind_bytes: Counter[str] = Counter()  # request and response, headers included
        body = sent = received = 0
        with open(self.access_log, "rb") as handle:
            handle.seek(start)
            for raw in handle:
                match = _LOG_LINE.match(raw.decode(errors="replace").rstrip("\n"))
                if not match:
                    kinds["unparsed"] += 1
                    continue
                status, body_bytes, bytes_sent, request_length, _method, path = match.groups()
                statuses[status] += 1
                kinds[file_kind(path)] += 1
                kind_bytes[file_kind(path)] += int(bytes_sent) + int(request_length)
                body += int(body_bytes)
                sent += int(bytes_sent)
                received += int(request_length)
        return {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
                "files": {k: kinds[k] for k in (*FILE_KINDS, "unparsed") if kinds[k]},
                "file_bytes": {k: kind_bytes[k] for k in FILE_KINDS if kind_bytes[k]},
                "body_bytes": body, "bytes_sent": sent, "request_bytes": received}


# --- worker processes ------------------------------------------------------------------------


def _proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _folder_bytes(folder: Path) -> tuple[int, int, int]:
    """Apparent bytes of regular files: (TUF metadata and caches, model files, files)."""
    sizes = {"tuf": 0, "models": 0}
    files = 0
    stack = [(folder, None)]
    while stack:
        path, top = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, top or entry.name))
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    if top in sizes:
                        sizes[top] += entry.stat(follow_symlinks=False).st_size
    return sizes["tuf"], sizes["models"], files


class Poll(NamedTuple):
    """One device's poll, as a worker reports it."""

    device_id: str
    requests: int
    wire_bytes: int
    not_modified: int
    downloads: int  # artifacts (model files)
    state: str  # the bench model's result: active, unchanged, not_selected, failed, ... or error
    installed: str | None  # the bench model's version on the device after the poll
    ms: float
    error: str | None = None


def _completed(pool, work, items: list, window: int):
    """(position, result) of `work(item)` for every item as it completes, `window` at a time:
    the worker holds no more than that many devices in flight, nor their bookkeeping."""
    pending = iter(enumerate(items))
    running = {pool.submit(work, item): position for position, item in itertools.islice(pending, window)}
    while running:
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            yield running.pop(future), future.result()
            for position, item in itertools.islice(pending, 1):
                running[pool.submit(work, item)] = position


def _worker(conn, config: dict) -> None:
    """One worker process: polls the devices it is sent, `threads` at a time."""
    logging.basicConfig(level=logging.CRITICAL)
    from model_signing import verifying  # noqa: F401  (what a poll imports, imported before the baseline)
    from tuf.ngclient import Updater  # noqa: F401

    from pipelines.edge.agent import EdgeAgent, smoke_inference
    from pipelines.edge.sources import TufDesiredState

    root = Path(config["device_root"])
    public_key = Path(config["public_key"])
    sessions: dict = {}  # the agents' onnxruntime sessions for serving, one per model file in this process
    smoke_inference(Path(config["warmup_model"]))  # onnxruntime's one-time set-up, before the baseline

    def poll(device: tuple[str, str]) -> Poll:
        device_id, group = device
        labels = config["groups"][group]
        folder = root / device_id
        began = time.perf_counter()
        try:
            source = TufDesiredState(config["url"], group, folder, config["trusted_root"])
            agent = EdgeAgent(device_id, labels, folder, source, public_key, config["telemetry_url"],
                              sessions=sessions, seed=0)
            results = agent.poll_once()
        except Exception as error:  # a broken device is counted, not fatal
            return Poll(device_id, 0, 0, 0, 0, "error", None, 0.0, f"{type(error).__name__}: {error}")
        ms = (time.perf_counter() - began) * 1000
        # No result for the model: the source failed (one result, model "-"), or the group's document
        # names no model at all (no result).
        mine = next((r for r in results if r.model == MODEL), None) or (results[0] if results else None)
        stats = source.stats
        return Poll(device_id, stats["requests"], stats["wire_bytes"], stats["not_modified"], agent.downloads,
                    mine.state if mine else "not_selected", agent.installed_version(MODEL), ms,
                    mine.error if mine else None)

    def disk(device_id: str) -> tuple[int, int, int]:
        return _folder_bytes(root / device_id)

    with concurrent.futures.ThreadPoolExecutor(config["threads"]) as pool:
        conn.send(("ready", {"rss": _proc_status("VmRSS")}))
        while True:
            command, payload = conn.recv()
            if command == "stop":
                break
            _reset_peak_rss()
            cpu = time.process_time()
            part = []  # results go back as they come: the worker does not keep them
            for position, result in _completed(pool, poll if command == "poll" else disk, payload,
                                               2 * config["threads"]):
                part.append((position, result))
                if len(part) == 500:
                    conn.send(("part", part))
                    part = []
            conn.send(("part", part))
            conn.send(("done", {"peak_rss": _proc_status("VmHWM"), "cpu_s": time.process_time() - cpu}))
    conn.close()


class Workers:
    """`processes` worker processes (spawned: this process has imported the release pipeline)."""

    def __init__(self, processes: int, config: dict):
        context = multiprocessing.get_context("spawn")
        self.links, self.processes = [], []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, config), daemon=True)
            process.start()
            child.close()
            self.links.append(parent)
            self.processes.append(process)
        self.baseline = [self._receive(link)[1]["rss"] for link in self.links]
        self.peak = list(self.baseline)
        self.cpu_s = 0.0  # of the last command, all workers

    def _receive(self, link) -> tuple[str, object]:
        try:
            return link.recv()
        except EOFError:
            raise SystemExit("a worker process died (see its error above)") from None

    def run(self, command: str, devices: list) -> list:
        """Every worker gets every `len(workers)`-th device; their results, in device order."""
        count = len(self.links)
        for index, link in enumerate(self.links):
            link.send((command, devices[index::count]))
        merged: list = [None] * len(devices)
        pending = {link: index for index, link in enumerate(self.links)}
        self.cpu_s = 0.0
        while pending:
            for link in multiprocessing.connection.wait(list(pending)):
                worker = pending[link]
                kind, data = self._receive(link)
                if kind == "part":
                    for position, result in data:
                        merged[worker + position * count] = result
                    continue
                del pending[link]
                self.cpu_s += data["cpu_s"]
                if command == "poll":
                    self.peak[worker] = max(self.peak[worker], data["peak_rss"])
        return merged

    def close(self) -> None:
        for link, process in zip(self.links, self.processes):
            try:
                link.send(("stop", None))
            except OSError:
                pass
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


# --- one fleet size --------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    if not values:
        return {"mean": 0, "min": 0, "max": 0}
    return {"mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values)}


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values) or [0.0]
    return {q: round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 1)
            for q, share in (("p50", 0.5), ("p95", 0.95), ("max", 1.0))}


def _phase(workers: Workers, nginx: Nginx, devices: list, selected: set[str], version: str,
           rounds: int | None = None) -> dict:
    """Rounds of one poll per device: `rounds` of them, or until every selected device runs
    `version`. Per device: the phase's requests, bytes, 304s and artifact downloads."""
    offset, server_cpu = nginx.offset(), nginx.cpu_seconds()
    totals = {d[0]: [0, 0, 0, 0] for d in devices}
    seconds, client_cpu, states, errors, poll_ms = 0.0, 0.0, Counter(), [], []
    done = 0
    for done in range(1, (rounds or MAX_ROUNDS) + 1):
        start = time.perf_counter()
        records = workers.run("poll", devices)
        seconds += time.perf_counter() - start
        client_cpu += workers.cpu_s
        on_version = 0
        for poll in records:
            row = totals[poll.device_id]
            row[0] += poll.requests
            row[1] += poll.wire_bytes
            row[2] += poll.not_modified
            row[3] += poll.downloads
            states[poll.state] += 1
            poll_ms.append(poll.ms)
            if poll.error and len(errors) < 5:
                errors.append(f"{poll.device_id}: {poll.state}: {poll.error}")
            on_version += poll.device_id in selected and poll.installed == version
        if rounds is None and on_version == len(selected):
            break
    else:
        if rounds is None:
            raise SystemExit(f"{len(devices)} devices did not converge on v{version} in {MAX_ROUNDS} rounds: "
                             f"{dict(states)}; {errors}")
    server = nginx.counts(offset)
    server["cpu_s"] = round(nginx.cpu_seconds() - server_cpu, 2)

    def per_device(ids) -> dict:
        rows = [totals[d] for d in ids]
        return {"devices": len(rows), "requests": _spread([r[0] for r in rows]),
                "wire_bytes": _spread([r[1] for r in rows]), "not_modified": _spread([r[2] for r in rows]),
                "artifact_downloads": _spread([r[3] for r in rows])}

    others = [d[0] for d in devices if d[0] not in selected]
    client = {"requests": sum(r[0] for r in totals.values()), "wire_bytes": sum(r[1] for r in totals.values()),
              "cpu_s": round(client_cpu, 2)}
    return {"seconds": round(seconds, 2), "rounds": done, "states": dict(sorted(states.items())), "errors": errors,
            "poll_ms": _percentiles(poll_ms), "selected": per_device(sorted(selected)), "others": per_device(others),
            "client": client, "server": server,
            "server_requests_per_s": round(server["requests"] / seconds, 1) if seconds else None}


def _progress(what: str, phase: dict) -> None:
    states = ", ".join(f"{state} {count:,}" for state, count in phase["states"].items())
    print(f"  {what}: {phase['seconds']:.1f} s, {phase['rounds']} round(s); {states}", flush=True)


def run_tuf(devices: int, settings: Settings, nginx: Nginx, args, device_base: Path) -> dict:
    from pipelines.edge.simulator import assign_groups
    from pipelines.finops.catalog import load_catalog, load_fleet

    print(f"N = {devices:,} (TUF over HTTP, {args.processes} processes x {args.threads} threads)", flush=True)
    version = _current_version(settings) or _release(settings)
    trusted_root, warmup = _published(settings)
    fleet = load_fleet(settings.fleet_path, load_catalog(settings.device_catalog))
    width = max(5, len(str(devices)))
    fleet_devices = [(f"dev-{index:0{width}d}", group.name)
                     for index, group in enumerate(assign_groups(fleet.groups, devices, seed=0), start=1)]
    labels = {group.name: dict(group.labels) for group in fleet.groups}
    selected = {d[0] for d in fleet_devices if SELECTOR.items() <= labels[d[1]].items()}
    root = Path(tempfile.mkdtemp(prefix=f"n{devices}-", dir=device_base))
    config = {"url": nginx.url, "trusted_root": trusted_root, "device_root": str(root / "devices"),
              "public_key": str(settings.signing_public_key or settings.signing_keys()[1]),
              "telemetry_url": (root / "telemetry").as_uri(), "threads": args.threads, "warmup_model": str(warmup),
              "groups": labels}
    workers = Workers(args.processes, config)
    try:
        cold = _phase(workers, nginx, fleet_devices, selected, version)
        _progress(f"cold start on v{version}", cold)
        quiet = _phase(workers, nginx, fleet_devices, selected, version, rounds=1)
        _progress("quiet poll", quiet)
        new_version = _release(settings)
        update = _phase(workers, nginx, fleet_devices, selected, new_version)
        _progress(f"update to v{new_version}", update)
        folders = workers.run("disk", [d[0] for d in fleet_devices])
        baseline, peak = sum(workers.baseline), sum(workers.peak)
    finally:
        workers.close()
        shutil.rmtree(root, ignore_errors=True)
    in_flight = args.processes * args.threads
    return {
        "devices": devices, "selected": len(selected), "processes": args.processes, "threads": args.threads,
        "from_version": version, "to_version": new_version,
        "phases": {"cold_start": cold, "quiet_poll": quiet, "update": update},
        "client_memory": {"workers_rss_before_bytes": baseline, "workers_peak_rss_bytes": peak,
                          "devices_in_flight": in_flight,
                          "bytes_per_device_in_flight": round((peak - baseline) / in_flight)},
        "disk_per_device": {"tuf_bytes": _spread([f[0] for f in folders]), "model_bytes": _spread([f[1] for f in folders]),
                            "files": _spread([f[2] for f in folders])},
    }


# --- Git per device --------------------------------------------------------------------------


def run_git(devices: int, settings: Settings) -> dict:
    """`devices` agents, each with its own shallow clone, polling one after another."""
    from pipelines.edge.simulator import Fleet

    print(f"N = {devices:,} (Git per device)", flush=True)
    version = _current_version(settings) or _release(settings)
    fleet = Fleet(devices, settings, seed=0, source="git")

    def until(target: str) -> tuple[float, int]:
        seconds = 0.0
        for rounds in range(1, MAX_ROUNDS + 1):
            record = fleet.poll_round()
            seconds += record["seconds"]
            info = record["models"].get(MODEL)
            if info and info["on_desired"] == info["selected"] and info["desired"] == [target]:
                return seconds, rounds
        raise SystemExit(f"{devices} Git devices did not converge on v{target} in {MAX_ROUNDS} rounds")

    cold_s, cold_rounds = until(version)
    first = fleet.rounds[0]
    quiet = fleet.poll_round()
    print(f"  cold start on v{version}: {cold_s:.1f} s", flush=True)
    new_version = _release(settings)
    update_s, update_rounds = until(new_version)
    print(f"  update to v{new_version}: {update_s:.1f} s", flush=True)
    update = fleet.rounds[-update_rounds:]
    result = fleet.result()
    shutil.rmtree(fleet.root, ignore_errors=True)
    return {"devices": devices, "selected": result["rounds"][-1]["models"][MODEL]["selected"],
            "from_version": version, "to_version": new_version,
            "cold_start": {"seconds": round(cold_s, 2), "rounds": cold_rounds,
                           "bytes_per_device": first["source_bytes_per_device"]["mean"]},
            "quiet_poll": {"seconds": quiet["seconds"], "bytes_per_device": quiet["source_bytes_per_device"]["mean"]},
            "update": {"seconds": round(update_s, 2), "rounds": update_rounds,
                       "bytes_per_device": round(sum(r["source_bytes_per_device"]["mean"] for r in update), 1)},
            "downloads_per_selected_device": result["downloads_per_device"]}


# --- output ----------------------------------------------------------------------------------


def _count(spread: dict) -> str:
    if spread["min"] == spread["max"]:
        return f"{spread['min']:,}"
    return f"{spread['mean']:,.2f} ({spread['min']:,}-{spread['max']:,})"


def device_table(runs: list[dict]) -> str:
    lines = ["Per device, TUF over HTTP (mean, range if it varies): devices the model selects | the others",
             f"{'N':>8} {'phase':<7} {'requests':>9} {'304s':>5} {'wire B':>8} {'artifacts':>9} |"
             f" {'requests':>8} {'304s':>5} {'wire B':>8}"]
    for run in runs:
        for name, phase in run["phases"].items():
            sel, oth = phase["selected"], phase["others"]
            lines.append(
                f"{run['devices']:>8,} {name.split('_')[0]:<7} {_count(sel['requests']):>9}"
                f" {_count(sel['not_modified']):>5} {sel['wire_bytes']['mean']:>8,.0f}"
                f" {_count(sel['artifact_downloads']):>9} | {_count(oth['requests']):>8}"
                f" {_count(oth['not_modified']):>5} {oth['wire_bytes']['mean']:>8,.0f}")
    return "\n".join(lines)


def server_table(runs: list[dict]) -> str:
    lines = ["Server (nginx access log): requests per device by file; the phase's requests per second, bytes out, "
             "CPU of nginx and of the simulated devices",
             f"{'N':>8} {'phase':<7} " + " ".join(f"{k[:6]:>6}" for k in FILE_KINDS[:-1])
             + f" {'other':>5} {'req/s':>7} {'MB out':>7} {'nginx CPU us/req':>16} {'client CPU ms/dev':>17}"
             f" {'server/client B':>15}"]
    for run in runs:
        for name, phase in run["phases"].items():
            server, client = phase["server"], phase["client"]
            files = [server["files"].get(k, 0) / run["devices"] for k in FILE_KINDS[:-1]]
            other = server["files"].get("other", 0) + server["files"].get("unparsed", 0)
            ratio = (server["bytes_sent"] + server["request_bytes"]) / client["wire_bytes"] if client["wire_bytes"] else 0
            lines.append(f"{run['devices']:>8,} {name.split('_')[0]:<7} " + " ".join(f"{f:>6.2f}" for f in files)
                         + f" {other:>5} {phase['server_requests_per_s']:>7,.0f} {server['bytes_sent'] / 1e6:>7.2f}"
                         f" {server['cpu_s'] * 1e6 / max(1, server['requests']):>16,.0f}"
                         f" {client['cpu_s'] * 1000 / run['devices']:>17.1f} {ratio:>15.3f}")
    return "\n".join(lines)


def fleet_table(runs: list[dict], git: dict | None) -> str:
    lines = ["Fleet: seconds to converge (rounds), client memory, a device's folder after the update",
             f"{'N':>8} {'source':<9} {'selected':>8} {'clients':>7} {'cold s':>10} {'update s':>10}"
             f" {'RSS MiB before/peak':>19} {'RSS KiB/device':>14} {'disk KiB tuf+models':>19}"]
    for run in runs:
        cold, update, memory, disk = (run["phases"]["cold_start"], run["phases"]["update"], run["client_memory"],
                                      run["disk_per_device"])
        lines.append(
            f"{run['devices']:>8,} {'tuf+http':<9} {run['selected']:>8,} {memory['devices_in_flight']:>7}"
            f" {cold['seconds']:>6.1f} ({cold['rounds']}) {update['seconds']:>6.1f} ({update['rounds']})"
            f" {memory['workers_rss_before_bytes'] / 2**20:>9,.0f}/{memory['workers_peak_rss_bytes'] / 2**20:<9,.0f}"
            f" {memory['bytes_per_device_in_flight'] / 1024:>14,.0f}"
            f" {disk['tuf_bytes']['mean'] / 1024:>10.1f}+{disk['model_bytes']['mean'] / 1024:<8.1f}")
    if git:
        lines.append(f"{git['devices']:>8,} {'git':<9} {git['selected']:>8,} {1:>7}"
                     f" {git['cold_start']['seconds']:>6.1f} ({git['cold_start']['rounds']})"
                     f" {git['update']['seconds']:>6.1f} ({git['update']['rounds']})")
    return "\n".join(lines)


def git_table(runs: list[dict], git: dict) -> str:
    """Desired-state bytes per device (model files apart) and model files per selected device."""
    lines = ["Desired state bytes per device, model files apart (TUF: requests and responses with headers, "
             "Git: pack files only), and model files per selected device (cold start + update)",
             f"{'N':>8} {'source':<9} {'first poll B':>12} {'quiet poll B':>12} {'update B':>9}"
             f" {'downloads':>10} {'B/download':>10}"]
    downloads = git["downloads_per_selected_device"]
    lines.append(f"{git['devices']:>8,} {'git':<9} {git['cold_start']['bytes_per_device']:>12,.0f}"
                 f" {git['quiet_poll']['bytes_per_device']:>12,.0f} {git['update']['bytes_per_device']:>9,.0f}"
                 f" {_count(downloads):>10}"
                 f" {downloads['bytes_mean'] / downloads['mean'] if downloads['mean'] else 0:>10,.0f}")
    for run in runs:
        phases = run["phases"]
        state = {name: sum(b for k, b in p["server"]["file_bytes"].items() if k not in ("artifact", "bundle"))
                 / run["devices"] for name, p in phases.items()}
        files = [phases[name]["selected"]["artifact_downloads"] for name in ("cold_start", "update")]
        both = {k: files[0][k] + files[1][k] for k in ("mean", "min", "max")}
        fetched = sum(phases[name]["server"]["files"].get("artifact", 0) for name in ("cold_start", "update"))
        file_bytes = sum(phases[name]["server"]["file_bytes"].get(k, 0)
                         for name in ("cold_start", "update") for k in ("artifact", "bundle"))
        lines.append(f"{run['devices']:>8,} {'tuf+http':<9} {state['cold_start']:>12,.0f} {state['quiet_poll']:>12,.0f}"
                     f" {state['update']:>9,.0f} {_count(both):>10}"
                     f" {file_bytes / fetched if fetched else 0:>10,.0f}")
    return "\n".join(lines)


def targets_check(runs: list[dict]) -> list[str]:
    """The issue's targets, checked against the figures."""
    problems = []
    for run in runs:
        n, phases = run["devices"], run["phases"]
        quiet = phases["quiet_poll"]
        for who in ("selected", "others"):
            group = quiet[who]
            if group["devices"] and (group["requests"]["max"] != 1 or group["not_modified"]["min"] != 1
                                     or group["wire_bytes"]["max"] > QUIET_POLL_MAX_BYTES):
                problems.append(f"N={n}: a quiet poll of the {who} is not one 304 under 1 KB: {group}")
        for name in ("cold_start", "update"):
            downloads = phases[name]["selected"]["artifact_downloads"]
            if downloads["min"] != 1 or downloads["max"] != 1:
                problems.append(f"N={n} {name}: artifact downloads per selected device {downloads}")
        files = phases["update"]["server"]["files"]
        allowed = {"timestamp", "snapshot", "targets", "group", "artifact", "bundle"}
        if set(files) - allowed:
            problems.append(f"N={n} update: the server was also asked for {sorted(set(files) - allowed)}")
        for name, phase in phases.items():
            if phase["server"]["requests"] != phase["client"]["requests"]:
                problems.append(f"N={n} {name}: {phase['server']['requests']} requests in the access log, "
                                f"{phase['client']['requests']} counted by the devices")
            if phase["errors"]:
                problems.append(f"N={n} {name}: {phase['errors']}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000], help="fleet sizes (TUF over HTTP)")
    parser.add_argument("--processes", type=int, default=4, help="worker processes polling the devices")
    parser.add_argument("--threads", type=int, default=8, help="devices polled at once per worker process")
    parser.add_argument("--git-devices", type=int, default=100, help="Git per device comparison (0: none)")
    args = parser.parse_args()
    if min(args.devices) < 1 or args.processes < 1 or args.threads < 1 or args.git_devices < 0:
        parser.error("devices, processes and threads must be positive")
    logging.basicConfig(level=logging.ERROR)
    nginx_binary = find_nginx()

    root = get_settings().state
    # Everything local and under the bench's own folder, whatever EDGE_* points at.
    settings = Settings(state_dir=root / "bench" / "fleet-state", gitops_remote=None, artifact_store=None,
                        telemetry_store=None, mlflow_tracking_uri=None, mlflow_artifact_root=None,
                        s3_endpoint_url=None, signing_key=None, signing_public_key=None, fleet_file=None,
                        tuf_prefix="tuf", tuf_url=None, tuf_keys_dir=None, tuf_root_key=None,
                        tuf_snapshot_key=None, tuf_timestamp_key=None)
    (settings.state / "artifacts").mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                 else settings.state))
    nginx = Nginx(nginx_binary, settings.state / "artifacts", base / "nginx")
    started = time.perf_counter()
    runs, git = [], None
    try:
        nginx.start()
        print(f"nginx on 127.0.0.1:{nginx.port}; devices under {base.parent}", flush=True)
        runs = [run_tuf(n, settings, nginx, args, base) for n in args.devices]
    finally:
        nginx.stop()
        shutil.rmtree(base, ignore_errors=True)
    if args.git_devices:
        git = run_git(args.git_devices, settings)
    total = time.perf_counter() - started

    print()
    print(device_table(runs))
    print()
    print(server_table(runs))
    print()
    print(fleet_table(runs, git))
    if git:
        print()
        print(git_table(runs, git))
    problems = targets_check(runs)
    print()
    print("targets: " + ("every quiet poll one 304 under 1 KB, one artifact download per selected device and "
                         "phase, nothing else asked for on update, server and client counts agree"
                         if not problems else "NOT MET"))
    for problem in problems:
        print(f"  {problem}")
    print(f"total {total:.0f} s")
    out = root / "bench" / "fleet_convergence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "nginx": subprocess.run([nginx_binary, "-v"], capture_output=True, text=True).stderr.strip()},
        "model": MODEL, "seconds_total": round(total, 1), "runs": runs, "git_per_device": git,
        "targets_missed": problems}, indent=1))
    print(f"\nwrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
