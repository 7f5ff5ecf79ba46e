"""`make ui`: Airflow (api-server, scheduler, dag-processor, triggerer) and the MLflow UI on a
temporary state, bound to 127.0.0.1 only, stopped cleanly by Ctrl-C."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from stack.airflow_local import free_port, port_is_free

pytestmark = pytest.mark.integration

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp* write them


def _make_ui(state: Path, ui_port: int, mlflow_port: int) -> subprocess.Popen:
    """`make ui` in a session of its own, so that a signal to its group is a terminal's Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EDGE_"))}
    # `-o`: the virtualenv is taken as installed (the test never reinstalls it).
    return subprocess.Popen(
        ["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "ui", f"EDGE_STATE_DIR={state}",
         f"UI_PORT={ui_port}", f"MLFLOW_PORT={mlflow_port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _listening(pids: set[int]) -> dict[int, str]:
    """port -> hex local address of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:
                listening[int(port, 16)] = address
    return listening


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_make_ui_binds_loopback_only_and_stops_on_ctrl_c(tmp_path):
    ui_port, mlflow_port = free_port(), free_port()
    make = _make_ui(tmp_path / "state", ui_port, mlflow_port)
    lines: list[str] = []
    try:
        start = time.monotonic()
        while not any(line.startswith("New DAGs start paused") for line in lines):
            line = make.stdout.readline()
            assert line, "make ui exited early:\n" + "".join(lines)
            lines.append(line)
            assert time.monotonic() - start < 300, "".join(lines)
        started = time.monotonic() - start
        text = "".join(lines)
        base = f"http://127.0.0.1:{ui_port}"
        assert f"Airflow UI      {base}/" in text and f"Edge Releases   {base}/edge/" in text
        assert f"MLflow          http://127.0.0.1:{mlflow_port}/" in text
        password = re.search(r"login: admin / (\S+)", text).group(1)
        pids = {name: int(pid) for name, pid in re.findall(r"([a-z-]+) (\d+)", re.search(
            r"processes +(.*)", text).group(1))}
        assert set(pids) == {"api-server", "dag-processor", "scheduler", "triggerer", "mlflow"}

        # Every component reports healthy (the triggerer serves the approval task).
        deadline = time.monotonic() + 120
        while True:
            health = requests.get(f"{base}/api/v2/monitor/health", timeout=10).json()
            if all(health[c]["status"] == "healthy" for c in ("metadatabase", "scheduler", "triggerer",
                                                              "dag_processor")):
                break
            assert time.monotonic() < deadline, health
            time.sleep(1)
        token = requests.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=10)
        assert token.status_code == 201, token.text
        dags = requests.get(f"{base}/api/v2/dags", timeout=10,
                            headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        assert dags.status_code == 200
        assert requests.post(f"{base}/auth/token", json={"username": "admin", "password": "wrong"},
                             timeout=10).status_code == 401
        assert requests.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=10).text == "OK"
        experiments = requests.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search",
                                   params={"max_results": 5}, timeout=10)
        assert experiments.status_code == 200, experiments.text

        processes = _descendants(make.pid)
        assert set(pids.values()) <= processes
        listening = _listening(processes)
        assert {ui_port, mlflow_port} <= set(listening), listening
        assert all(address in LOOPBACK for address in listening.values()), listening

        stop = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = make.communicate(timeout=120)
        stopped = time.monotonic() - stop
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
    assert "Stopped api-server" in out, out
    assert not [pid for pid in processes if _alive(pid)], out
    assert port_is_free(ui_port) and port_is_free(mlflow_port)  # nothing listens any more
    print(f"make ui: up in {started:.1f} s, stopped in {stopped:.1f} s")


def test_make_ui_refuses_a_taken_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        make = _make_ui(tmp_path / "state", free_port(), port)
        out, _ = make.communicate(timeout=120)
    assert make.returncode != 0
    [error] = [line for line in out.splitlines() if line.startswith("error:")]
    assert error == (f"error: port {port} on 127.0.0.1 is taken: mlflow cannot listen there "
                     "(choose another with UI_PORT / MLFLOW_PORT)")
    assert not (tmp_path / "state" / "airflow" / "airflow.db").exists()  # nothing was started
