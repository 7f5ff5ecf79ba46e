"""A fleet of edge agents in one process: how fast a commit reaches every device, at what cost.

Devices get the labels of the fleet file's groups in proportion to the groups' `devices`
counts (largest remainder, then shuffled with the seed), ids `dev-00001`..., and a state
folder each under `<state>/fleet/<device_id>`. Every round, every device polls once, in
turn; a round's seconds are the wall time of all those polls on this host.

Source: by default (`tuf`) every device reads its group's signed desired state from the TUF
repository of the settings' store, each with its own metadata cache, as a real device does;
a round first publishes the GitOps tip (`publish_desired_state`, a no-op when nothing
changed), as the publisher does after every commit. With `git`, each device keeps its own
shallow clone of the GitOps repository and checks the attested manifests itself.

Traffic: with `serve`, after each round's polls every device runs its active models on
`serve` requests drawn from the model's production-like data (the spec's
`data.currentSource`, else its `data.source`), then sends its inference telemetry. Faults
(`Fault`) are injected into a cohort (a device group, the devices on one version, or all):
added latency, a share of failing requests, or shifted inputs.
"""

from __future__ import annotations

import fnmatch
import random
import re
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.edge.agent import EdgeAgent
from pipelines.edge.sources import GitDesiredState, TufDesiredState
from pipelines.settings import Settings

SourceMode = Literal["tuf", "git"]


@dataclass(frozen=True)
class Fault:
    """A fault injected into the devices of `group` (None: every group) that run `version`
    (None: any version) of `model` (None: every model)."""

    model: str | None = None
    version: str | None = None
    group: str | None = None
    latency_ms: float = 0.0
    error_rate: float = 0.0
    shift: dict[str, float] = field(default_factory=dict)  # feature (glob allowed) -> value added

    def applies(self, model: str, version: str | None, group: str) -> bool:
        return (self.model in (None, model) and self.version in (None, version)
                and self.group in (None, group))

    def describe(self) -> str:
        who = " ".join(f"{k}={v}" for k, v in (("model", self.model), ("version", self.version),
                                                 ("group", self.group)) if v) or "every device"
        what = [f"+{self.latency_ms:g} ms" for _ in [0] if self.latency_ms] + \
               [f"{self.error_rate:.0%} of requests fail" for _ in [0] if self.error_rate] + \
               [f"{k} {v:+g}" for k, v in self.shift.items()]
        return f"{who}: {', '.join(what) or 'nothing'}"


_FAULT_KEYS = {"model", "version", "group", "latency_ms", "error_rate", "shift"}


def parse_fault(text: str) -> Fault:
    """`version=2,error_rate=0.2` / `group=branch-kiosks,latency_ms=40` /
    `shift=age:+20;hours_per_week:+10` (comma-separated key=value)."""
    values: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in _FAULT_KEYS:
            raise ValueError(f"fault {text!r}: {part!r} is not one of {', '.join(sorted(_FAULT_KEYS))} = value")
        if key in ("latency_ms", "error_rate"):
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"fault {text!r}: {key} must be a number") from None
            if key == "error_rate" and not 0 <= values[key] <= 1:
                raise ValueError(f"fault {text!r}: error_rate must lie in [0, 1]")
        elif key == "shift":
            shift = {}
            for item in filter(None, value.split(";")):
                name, _, amount = item.partition(":")
                if not re.match(r"^[+-]?[0-9.]+$", amount.strip()):
                    raise ValueError(f"fault {text!r}: shift {item!r} must be feature:+number")
                shift[name.strip()] = float(amount)
            values["shift"] = shift
        else:
            values[key] = value.removeprefix("v") if key == "version" else value
    return Fault(**values)


def traffic(model: str, settings: Settings):
    """Requests for `model`: the rows of its spec's production-like data, and the names of the
    model's raw features among their columns (the rest, the target and the sensitive features,
    is what the world knows and the device never sees)."""
    from pipelines.data import read_source, resolve_features
    from pipelines.specs import load_spec, spec_dir

    path = Path(settings.specs_dir) / f"{model}.yaml"
    spec = load_spec(path)
    data = spec.data.model_copy(update={"source": spec.data.current_source or spec.data.source})
    frame = read_source(data, spec_dir(path), settings.s3_endpoint_url)
    features = resolve_features(spec.data.features, list(frame.columns))
    known = [c for c in (spec.data.target, *spec.data.sensitive_features) if c in frame.columns and c not in features]
    return frame[features + known].reset_index(drop=True), features


@dataclass(frozen=True)
class OutcomeShift:
    """The world changing for some people: among the served rows whose `column` equals `value`,
    a `rate` share of those whose true outcome is not `label` turn out to be `label` (a model
    trained before the change now misjudges that group)."""

    column: str
    value: str
    label: int
    rate: float

    def describe(self) -> str:
        return f"{self.rate:.0%} of the outcomes of {self.column}={self.value} become {self.label}"


def _shifted(rows, shift: dict[str, float]):
    rows = rows.copy()
    for pattern, amount in shift.items():
        for column in [c for c in rows.columns if fnmatch.fnmatchcase(c, pattern)]:
            rows[column] = rows[column] + amount
    return rows


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
                 source: SourceMode = "tuf", keep: bool = False):
        from pipelines.finops.catalog import load_catalog, load_fleet

        if devices < 1:
            raise ValueError("a fleet needs at least one device")
        fleet = load_fleet(Path(fleet_path or settings.fleet_path), load_catalog(settings.device_catalog))
        # The publisher renders one document per group of this very fleet file.
        self.settings = settings if fleet_path is None else settings.model_copy(update={"fleet_file": Path(fleet_path)})
        self.source_mode = source
        self.root = settings.state / "fleet"
        # The simulator owns this folder: a previous run's devices would start converged, which
        # is what `keep` asks for (the same devices see the next release or a rollback).
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        public_key = settings.signing_public_key or settings.signing_keys()[1]
        trusted_root = None
        if source == "tuf":
            from pipelines.edge.publish import ensure_repository

            trusted_root = ensure_repository(self.settings).trusted_root()
        self.groups = {}
        self.agents: list[EdgeAgent] = []
        self.seed = seed
        sessions: dict = {}  # one onnxruntime session per model file for the whole simulated fleet
        for index, group in enumerate(assign_groups(fleet.groups, devices, seed), start=1):
            device_id = f"dev-{index:05d}"
            folder = self.root / device_id
            if source == "tuf":
                device_source = TufDesiredState(settings.device_tuf_url, group.name, folder, trusted_root)
            else:
                device_source = GitDesiredState(settings.remote, settings.gitops_branch, folder / "gitops",
                                                settings.store_url, public_key, settings.s3_endpoint_url)
            self.agents.append(EdgeAgent(device_id, dict(group.labels), folder, device_source, public_key,
                                         settings.telemetry_url, settings.s3_endpoint_url, sessions=sessions,
                                         seed=seed))
            self.groups[device_id] = group.name
        self.rounds: list[dict] = []
        self._selected_devices: set[str] = set()
        self._traffic: dict = {}
        # The business system's side: which row of the world each served request was, by the
        # inference id the app passed with it (labels and sensitive attributes come from there).
        self._served: dict[str, list] = {}
        self._next_id = 0

    def serve_round(self, requests: int, faults: list[Fault] = ()) -> dict:
        """Every device runs `requests` requests on each active model, then reports; per
        model and version: devices, requests, failed requests."""
        import numpy as np

        served: dict[str, dict[str, Counter]] = {}
        rng = np.random.default_rng([self.seed, len(self.rounds)])
        for agent in self.agents:
            for model, info in sorted(agent.state["models"].items()):
                if agent.active_model_path(model) is None:
                    continue
                if model not in self._traffic:
                    self._traffic[model] = traffic(model, self.settings)
                pool, features = self._traffic[model]
                picked = rng.integers(0, len(pool), size=requests)
                rows = pool.iloc[picked][features].reset_index(drop=True)
                ids = [f"{agent.device_id}.{self._next_id + i}" for i in range(requests)]
                self._next_id += requests
                self._served.setdefault(model, []).append((ids, picked))
                group = self.groups[agent.device_id]
                active = [f for f in faults if f.applies(model, info["version"], group)]
                latency = sum(f.latency_ms for f in active)
                fail = None
                for fault in active:
                    if fault.shift:
                        rows = _shifted(rows, fault.shift)
                    if fault.error_rate:
                        hits = rng.random(requests) < fault.error_rate
                        fail = hits if fail is None else fail | hits
                predictions = agent.serve(model, rows, added_latency_ms=latency, fail=fail, ids=ids)
                counts = served.setdefault(model, {}).setdefault(info["version"], Counter())
                counts["devices"] += 1
                counts["requests"] += len(predictions)
                counts["errors"] += sum(p is None for p in predictions)
            agent.flush_telemetry()
        return {model: {version: dict(c) for version, c in sorted(by_version.items())}
                for model, by_version in sorted(served.items())}

    def outcomes(self, model: str, shift: OutcomeShift | None = None, seed: int = 0, inputs: bool = False):
        """What the business system learns later about every request served so far: one row per
        inference id with the true `label` (the spec's target) and the sensitive attributes the
        world knows (with `inputs`, the request's features too, as the business system keeps
        them). The served log is emptied: each request's outcome is told once."""
        import numpy as np
        import pandas as pd

        served = self._served.pop(model, [])
        if not served:
            return pd.DataFrame(columns=["inference_id", "label"])
        pool, features = self._traffic[model]
        ids = [i for batch, _ in served for i in batch]
        rows = pool.iloc[np.concatenate([picked for _, picked in served])]
        rows = rows if inputs else rows.drop(columns=features)
        from pipelines.specs import load_spec

        target = load_spec(Path(self.settings.specs_dir) / f"{model}.yaml").data.target
        frame = rows.rename(columns={target: "label"}).reset_index(drop=True)
        frame.insert(0, "inference_id", ids)
        if shift is not None:
            rng = np.random.default_rng([seed, len(frame)])
            hit = (frame[shift.column].astype(str) == shift.value) & (frame["label"] != shift.label)
            frame.loc[hit & (rng.random(len(frame)) < shift.rate), "label"] = shift.label
        return frame

    def _source_bytes(self, before: list[int]) -> list[int]:
        """Bytes each device's source brought in during this round."""
        return [now - then for now, then in zip(self._wire_bytes(), before)]

    def _wire_bytes(self) -> list[int]:
        return [a.source.stats["wire_bytes"] for a in self.agents]

    def poll_round(self) -> dict:
        """Every device polls once; returns this round's record (also kept in `rounds`)."""
        if self.source_mode == "tuf":
            from pipelines.edge.publish import publish_desired_state

            publish_desired_state(self.settings)
        before = self._wire_bytes()
        start = time.perf_counter()
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
        source_bytes = self._source_bytes(before)
        record = {"round": len(self.rounds) + 1, "seconds": round(seconds, 3),
                  "source_bytes_per_device": {"mean": round(statistics.fmean(source_bytes), 1),
                                              "max": max(source_bytes)},
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
            "devices": len(self.agents), "source": self.source_mode,
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
             source: SourceMode = "tuf", keep: bool = False, serve: int = 0, faults: list[Fault] = ()) -> dict:
    """Run `rounds` polls of `devices` agents (fresh, or those of the last run with `keep`),
    each followed by `serve` requests per device and model; convergence per round and per
    model, and the traffic served."""
    fleet = Fleet(devices, settings, seed, fleet_path, source, keep)
    served = []
    for _ in range(rounds):
        fleet.poll_round()
        if serve:
            served.append(fleet.serve_round(serve, faults))
    result = fleet.result()
    result["served"] = served
    result["faults"] = [f.describe() for f in faults]
    return result


def format_convergence(result: dict) -> str:
    """The simulation as a table: one row per round, then downloads and convergence."""
    models = sorted({m for r in result["rounds"] for m in r["models"]})
    lines = [f"Fleet of {result['devices']} devices (source: {result['source']}); groups: "
             + ", ".join(f"{g} {n}" for g, n in result["groups"].items()), ""]
    header = f"{'round':>5}  {'seconds':>8}  {'bytes/device':>12}  " + "  ".join(f"{m:<28}" for m in models) \
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
        wire = f"{record['source_bytes_per_device']['mean']:,.0f}"
        states = ", ".join(f"{s} {n}" for s, n in record["states"].items())
        lines.append(f"{record['round']:>5}  {record['seconds']:>8.2f}  {wire:>12}  " + "  ".join(cells) + f"  {states}")
    downloads = result["downloads_per_device"]
    lines += ["", f"artifact downloads per device with a model: min {downloads['min']}, mean {downloads['mean']:.2f}, "
                  f"max {downloads['max']} ({downloads['devices_with_models']} devices, {downloads['total']} in all)"]
    for model in models:
        done = result["converged_round"].get(model)
        lines.append(f"{model}: " + (f"every selected device on the desired version since round {done}" if done
                                     else "NOT converged"))
    if not models:
        lines.append("no model selects any device of this fleet")
    for fault in result.get("faults") or []:
        lines.append(f"fault injected: {fault}")
    for index, served in enumerate(result.get("served") or [], start=1):
        for model, by_version in served.items():
            parts = [f"v{v}: {c['devices']} devices, {c['requests']} requests, {c['errors']} failed"
                     for v, c in by_version.items()]
            lines.append(f"round {index} traffic {model}: " + "; ".join(parts))
    return "\n".join(lines)
