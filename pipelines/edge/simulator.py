"""A fleet of edge agents in one process: how fast a commit reaches every device, at what cost.

Devices get the labels of the fleet file's groups in proportion to the groups' `devices`
counts (largest remainder, then shuffled with the seed), ids `dev-00001`..., and a state
folder each under `<state>/fleet/<device_id>`. Every round, every device polls once, in
turn; a round's seconds are the wall time of all those polls on this host.

Git: in `per-device` mode each device keeps its own shallow clone, as a real device does.
In `shared` mode (the default above `PER_DEVICE_GIT_LIMIT` devices, where a thousand clones
and fetches per round would dominate the run) one clone is fetched once per round and every
device reads that round's objects. The bytes reported per device are then the shared
clone's: exactly what each device's own incremental fetch would transfer, because every
device polls every round and so sits at the same commit as the shared clone.
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pipelines.edge.agent import EdgeAgent
from pipelines.edge.desired import GitSource
from pipelines.settings import Settings

PER_DEVICE_GIT_LIMIT = 200
GitMode = Literal["auto", "per-device", "shared"]


class _RoundSource:
    """The objects the shared clone fetched this round (shared mode)."""

    def __init__(self) -> None:
        self.objects: list[dict] = []

    def fetch(self) -> list[dict]:
        return self.objects


def assign_groups(groups: list, devices: int, seed: int = 0) -> list:
    """`devices` group picks in proportion to each group's device count (largest remainder)."""
    total = sum(g.devices for g in groups)
    if total <= 0:
        raise ValueError("the fleet file has no devices")
    exact = [devices * g.devices / total for g in groups]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(groups)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: devices - sum(counts)]:
        counts[i] += 1
    picks = [g for g, n in zip(groups, counts) for _ in range(n)]
    random.Random(seed).shuffle(picks)
    return picks


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.5), "p95": at(0.95), "max": round(ordered[-1], 2)}


class Fleet:
    """N agents on the settings' GitOps remote and artifact store; `poll_round()` runs one round."""

    def __init__(self, devices: int, settings: Settings, seed: int = 0, fleet_path: Path | None = None,
                 git: GitMode = "auto", keep: bool = False):
        from pipelines.finops.catalog import load_catalog, load_fleet

        if devices < 1:
            raise ValueError("a fleet needs at least one device")
        fleet = load_fleet(Path(fleet_path or settings.fleet_path), load_catalog())
        self.settings = settings
        self.git_mode = git if git != "auto" else ("per-device" if devices <= PER_DEVICE_GIT_LIMIT else "shared")
        self.root = settings.state / "fleet"
        # The simulator owns this folder: a previous run's devices would start converged, which
        # is what `keep` asks for (the same devices see the next release or a rollback).
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        public_key = settings.signing_public_key or settings.signing_keys()[1]
        self._shared: GitSource | None = None
        self._round_source = _RoundSource()
        if self.git_mode == "shared":
            self._shared = GitSource(settings.remote, settings.gitops_branch, self.root / "_shared-gitops")
        self.groups = {}
        self.agents: list[EdgeAgent] = []
        for index, group in enumerate(assign_groups(fleet.groups, devices, seed), start=1):
            device_id = f"dev-{index:05d}"
            folder = self.root / device_id
            source = self._round_source if self._shared else \
                GitSource(settings.remote, settings.gitops_branch, folder / "gitops")
            self.agents.append(EdgeAgent(device_id, dict(group.labels), folder, source, public_key,
                                         settings.store_url, settings.s3_endpoint_url))
            self.groups[device_id] = group.name
        self.rounds: list[dict] = []
        self._selected_devices: set[str] = set()

    def _git_bytes(self) -> list[int]:
        if self._shared is not None:
            return [self._shared.stats[-1].bytes] * len(self.agents)
        return [a.source.stats[-1].bytes if a.source.stats else 0 for a in self.agents]

    def poll_round(self) -> dict:
        """Every device polls once; returns this round's record (also kept in `rounds`)."""
        start = time.perf_counter()
        if self._shared is not None:
            self._round_source.objects = self._shared.fetch()
        states: Counter[str] = Counter()
        selected: dict[str, dict[str, str]] = {}  # model -> device -> desired version
        poll_ms: list[float] = []
        for agent in self.agents:
            began = time.perf_counter()
            results = agent.poll_once()
            poll_ms.append((time.perf_counter() - began) * 1000)
            for result in results:
                states[result.state] += 1
                if result.state != "not_selected" and result.model != "-":
                    selected.setdefault(result.model, {})[agent.device_id] = result.version or ""
        seconds = time.perf_counter() - start
        self._selected_devices = {d for wanted in selected.values() for d in wanted}
        by_id = {a.device_id: a for a in self.agents}
        models = {}
        for model, wanted in sorted(selected.items()):
            versions = Counter(by_id[d].installed_version(model) or "none" for d in wanted)
            on_desired = sum(1 for d, v in wanted.items() if by_id[d].installed_version(model) == v)
            models[model] = {"desired": sorted(set(wanted.values())), "selected": len(wanted),
                             "on_desired": on_desired, "versions": dict(sorted(versions.items()))}
        git_bytes = self._git_bytes()
        record = {"round": len(self.rounds) + 1, "seconds": round(seconds, 3),
                  "git_kind": (self._shared.stats[-1].kind if self._shared else
                               Counter(a.source.stats[-1].kind for a in self.agents).most_common(1)[0][0]),
                  "git_bytes_per_device": {"mean": round(statistics.fmean(git_bytes), 1), "max": max(git_bytes)},
                  "device_poll_ms": _percentiles(poll_ms), "states": dict(sorted(states.items())), "models": models}
        self.rounds.append(record)
        return record

    def converged(self) -> bool:
        """Whether, after the last round, every selected device runs its desired version."""
        if not self.rounds:
            return False
        return all(m["on_desired"] == m["selected"] for m in self.rounds[-1]["models"].values())

    def result(self) -> dict:
        converged_round: dict[str, int | None] = {}
        for record in self.rounds:
            for model, info in record["models"].items():
                done = info["on_desired"] == info["selected"]
                if done and converged_round.get(model) is None:
                    converged_round[model] = record["round"]
                elif not done:
                    converged_round[model] = None
        selected_devices = self._selected_devices
        downloads = {a.device_id: a.downloads for a in self.agents}
        chosen = [downloads[d] for d in sorted(selected_devices)] or [0]
        artifact_bytes = [a.downloaded_bytes for a in self.agents if a.device_id in selected_devices] or [0]
        return {
            "devices": len(self.agents), "git_mode": self.git_mode,
            "groups": dict(sorted(Counter(self.groups.values()).items())),
            "rounds": self.rounds, "converged_round": converged_round,
            "seconds_total": round(sum(r["seconds"] for r in self.rounds), 3),
            "downloads_per_device": {"devices_with_models": len(selected_devices), "min": min(chosen),
                                     "mean": round(statistics.fmean(chosen), 3), "max": max(chosen),
                                     "total": sum(downloads.values()),
                                     "bytes_mean": round(statistics.fmean(artifact_bytes), 1)},
            "downloads": downloads,
        }


def simulate(devices: int, rounds: int, settings: Settings, seed: int = 0, fleet_path: Path | None = None,
             git: GitMode = "auto", keep: bool = False) -> dict:
    """Run `rounds` polls of `devices` agents (fresh, or those of the last run with `keep`);
    convergence per round and per model."""
    fleet = Fleet(devices, settings, seed, fleet_path, git, keep)
    for _ in range(rounds):
        fleet.poll_round()
    return fleet.result()


def format_convergence(result: dict) -> str:
    """The simulation as a table: one row per round, then downloads and convergence."""
    models = sorted({m for r in result["rounds"] for m in r["models"]})
    lines = [f"Fleet of {result['devices']} devices (git: {result['git_mode']}); groups: "
             + ", ".join(f"{g} {n}" for g, n in result["groups"].items()), ""]
    header = f"{'round':>5}  {'seconds':>8}  {'git bytes/device':>16}  " + "  ".join(f"{m:<28}" for m in models) \
        + "  states"
    lines.append(header)
    for record in result["rounds"]:
        cells = []
        for model in models:
            info = record["models"].get(model)
            if info is None:
                cells.append(f"{'-':<28}")
                continue
            versions = ", ".join(f"v{v} {n}" if v != "none" else f"none {n}" for v, n in info["versions"].items())
            cells.append(f"{info['on_desired']}/{info['selected']} ({versions})"[:28].ljust(28))
        git = f"{record['git_bytes_per_device']['mean']:,.0f} ({record['git_kind']})"
        states = ", ".join(f"{s} {n}" for s, n in record["states"].items())
        lines.append(f"{record['round']:>5}  {record['seconds']:>8.2f}  {git:>16}  " + "  ".join(cells) + f"  {states}")
    downloads = result["downloads_per_device"]
    lines += ["", f"artifact downloads per device with a model: min {downloads['min']}, mean {downloads['mean']:.2f}, "
                  f"max {downloads['max']} ({downloads['devices_with_models']} devices, {downloads['total']} in all)"]
    for model in models:
        done = result["converged_round"].get(model)
        lines.append(f"{model}: " + (f"every selected device on the desired version since round {done}" if done
                                     else "NOT converged"))
    if not models:
        lines.append("no model selects any device of this fleet")
    return "\n".join(lines)
