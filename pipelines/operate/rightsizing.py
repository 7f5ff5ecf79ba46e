"""Right-sizing: the `resources` a model's device groups should ask for, from what their
devices measured, offered as a review-branch change to the spec (never applied silently).

Over a window of telemetry, for the version most devices run (a rejected release runs nowhere),
each device's latest `measurements` (its install's smoke test: `rss_bytes`, the resident memory
the model's session added; `cpu_ms` and `wall_ms`, thread CPU and elapsed time per inference,
medians of 20 runs) and its inference records (requests served) give, per device:

- memory: `rss_bytes`;
- sustained CPU in cores: `cpu_ms` per inference x the inferences it served per second over
  the time it was reporting them (its first record of the version in the window to its last);
- single-inference burst in cores: what one inference needs of a CPU limit so that the limit
  never stalls it. A limit of L cores grants L x 100 ms of CPU per CFS period (Kubernetes'
  default); an inference is never throttled when its `cpu_ms` fits in that quota or when L
  covers the share of a core it keeps busy while it runs (`cpu_ms / wall_ms`, at most one with
  the agent's single inference thread): burst = min(cpu_ms / 100 ms, cpu_ms / wall_ms).

Per device group of the spec (and over every device, the spec-wide figure), p95 is the
nearest-rank 95th percentile over devices (with fewer than 20 devices, the largest), and:

- requests.memory = p95 rss x headroom, requests.cpu = p95 sustained cores x headroom;
- limits.memory = max(largest rss x 1.5, requests.memory, the memory the release's memory gate
  estimated the group needs): a limit is never lowered below what the gate judged;
- limits.cpu = max(requests.cpu x 2, p95 burst): a limit under the burst stalls inferences;
- memory rounded up to 16Mi steps (at least 16Mi), CPU to 10m steps (at least 10m).

Each figure is set against the group's current value (its `targets[].resources` over the
spec-wide `resources`): under-provisioned below the recommendation, over-provisioned at twice
it or more, ok between (the band keeps a merged proposal from being proposed again), unset.
A figure measured on fewer devices than `min_devices` gets no recommendation.

The recommendation is kept as evidence (`finops/<model>/rightsizing/<stamp>.json` in the
artifact store). `propose` turns the figures that are not ok into each group's
`targets[].resources` in the spec file of the specs repository (`EDGE_SPECS_REMOTE`), edited as
text so comments and key order stay, and pushes it to the branch `rightsize/<model>/<date>`
for review; the repository's main branch never moves, and a change already proposed on a
`rightsize/<model>/*` branch is not pushed again.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.records import Record
from pipelines.settings import Settings, get_settings
from pipelines.specs import ModelSpec, ResourcesSpec, parse_quantity

HEADROOM = 1.2
MIN_DEVICES = 5
MEMORY_LIMIT_FACTOR = 1.5  # limits.memory over the largest device's
CPU_LIMIT_FACTOR = 2.0  # limits.cpu over requests.cpu
OVER_FACTOR = 2.0  # a current value at this multiple of the recommendation or more: over-provisioned
MEMORY_STEP = 16 * 2**20
CPU_STEP_MILLI = 10
CFS_PERIOD_MS = 100.0  # Kubernetes' default cpu.cfs_period_us: a CPU limit is a quota per period
SPEC_WIDE = "(spec-wide)"
RESOURCES = ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory")
BY = "finops-rightsize"


class RightsizingError(ValueError):
    """Bad input or a spec that cannot be edited: one line naming the model, file or field."""


class DeviceFigures(Record):
    """What one device measured of the version the figures are for."""

    device_id: str
    group: str
    device_class: str | None = None
    rss_bytes: float | None = None
    cpu_ms: float | None = None
    wall_ms: float | None = None
    inferences: float = 0.0
    seconds: float = 0.0
    cores: float | None = Field(None, description="cpu_ms x inferences / seconds / 1000; None: seen only once.")
    burst_cores: float | None = Field(None, description="min(cpu_ms / CFS period, cpu_ms / wall_ms): the CPU limit "
                                                        "under which one inference stalls.")


class Figure(Record):
    resource: Literal["requests.cpu", "requests.memory", "limits.cpu", "limits.memory"]
    current: str | None
    recommended: str | None
    status: Literal["ok", "over-provisioned", "under-provisioned", "unset", "not enough devices measured"]


class ScopeRecommendation(Record):
    """One device group (or the spec-wide figure over every device)."""

    group: str
    devices: int = Field(description="Devices that reported measurements of the version.")
    memory_devices: int = Field(description="Devices behind the memory figures (rss measured).")
    cpu_devices: int = Field(description="Devices behind the CPU figures (reporting over a span of the window).")
    rss_p95_bytes: float | None = None
    rss_max_bytes: float | None = None
    cpu_cores_p95: float | None = None
    cpu_cores_max: float | None = None
    burst_cores_p95: float | None = None
    inferences_per_second_p95: float | None = None
    gate_memory_bytes: int | None = Field(None, description="What the release's memory gate estimated it needs.")
    current: dict = Field(default_factory=dict, description="Effective resources now (requests/limits).")
    figures: list[Figure]
    note: str | None = None

    def figure(self, resource: str) -> Figure:
        return next(f for f in self.figures if f.resource == resource)


class Proposal(Record):
    status: Literal["pushed", "already proposed", "nothing to change"]
    branch: str | None = None
    commit: str | None = None
    path: str | None = None
    remote: str | None = None
    changes: dict = Field(default_factory=dict, description="Group -> the targets[].resources written.")


class Rightsizing(Record):
    model: str
    version: str = Field(description="The version the figures were measured on (most devices run it).")
    gate_version: str = Field(description="The latest release, whose memory gate estimate floors limits.memory.")
    since: str
    until: str
    headroom: float
    min_devices: int
    rule: str
    groups: list[ScopeRecommendation]
    spec_wide: ScopeRecommendation
    devices: list[DeviceFigures]
    evidence: str | None = None
    proposal: Proposal | None = None

    def changes(self) -> dict[str, dict[str, dict[str, str]]]:
        """Per group, the figures that are not ok: {group: {section: {name: quantity}}}."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        for scope in self.groups:
            wanted = {f.resource: f.recommended for f in scope.figures}
            changed = {f.resource: f.recommended for f in scope.figures
                       if f.recommended is not None and f.status in ("over-provisioned", "under-provisioned", "unset")}
            for name in ("cpu", "memory"):
                # A request left as it is must not end above a lowered limit (and the other way
                # round): then both take the recommendation, which is coherent by construction.
                request = changed.get(f"requests.{name}") or scope.current.get(f"requests.{name}")
                limit = changed.get(f"limits.{name}") or scope.current.get(f"limits.{name}")
                if request and limit and parse_quantity(request) > parse_quantity(limit) \
                        and wanted[f"requests.{name}"] and wanted[f"limits.{name}"]:
                    changed[f"requests.{name}"] = wanted[f"requests.{name}"]
                    changed[f"limits.{name}"] = wanted[f"limits.{name}"]
            for resource in RESOURCES:  # in a stable order: requests first, cpu before memory
                if resource in changed:
                    section, name = resource.split(".")
                    out.setdefault(scope.group, {}).setdefault(section, {})[name] = changed[resource]
        return out

    def lines(self) -> list[str]:
        """The recommendation for people."""
        out = [f"Right-sizing of {self.model} v{self.version} from {self.since} to {self.until}: "
               f"{self.spec_wide.devices} devices measured"
               + (f" (memory gate figures of v{self.gate_version}, the latest release)"
                  if self.gate_version != self.version else ""), f"  rule: {self.rule}", "",
               "  group               devices  memory p95  memory max     cpu p95  burst p95  gate memory"]
        for scope in [*self.groups, self.spec_wide]:
            out.append(f"  {scope.group:<19} {scope.devices:>7}  {_mib(scope.rss_p95_bytes):>10}  "
                       f"{_mib(scope.rss_max_bytes):>10}  {_cores(scope.cpu_cores_p95):>10}  "
                       f"{_cores(scope.burst_cores_p95):>9}  {_mib(scope.gate_memory_bytes):>11}")
        out += ["", "  group               resource          current  recommended  status"]
        for scope in [*self.groups, self.spec_wide]:
            for i, f in enumerate(scope.figures):
                out.append(f"  {scope.group if not i else '':<19} {f.resource:<16} {f.current or '-':>8}  "
                           f"{f.recommended or '-':>11}  {f.status}")
            if scope.note:
                out.append(f"  {'':<19} ({scope.note})")
        if self.proposal is not None:
            p = self.proposal
            out += ["", {"pushed": f"  proposed on {p.branch} (commit {p.commit}) of {p.remote}: {p.path}",
                         "already proposed": f"  already proposed on {p.branch} (commit {p.commit}); nothing pushed",
                         "nothing to change": "  nothing to propose: every measured figure is ok"}[p.status]]
        if self.evidence:
            out.append(f"  evidence: {self.evidence}")
        return out


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3g}m"


def rule_text(headroom: float, min_devices: int) -> str:
    return (f"requests = p95 over devices x {headroom:g}; limits.memory = max(largest x {MEMORY_LIMIT_FACTOR:g}, "
            f"requests, the memory gate's estimate); limits.cpu = max(requests x {CPU_LIMIT_FACTOR:g}, p95 "
            f"single-inference burst min(cpu_ms / {CFS_PERIOD_MS:g} ms, cpu_ms / wall_ms)); memory up to 16Mi "
            f"steps, cpu up to 10m steps; under-provisioned below the recommendation, over-provisioned at "
            f"{OVER_FACTOR:g}x it or more; no figure from fewer than {min_devices} devices")


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (the largest value with fewer than 20)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def memory_quantity(value: float) -> str:
    return f"{max(1, math.ceil(value / MEMORY_STEP - 1e-9)) * MEMORY_STEP // 2**20}Mi"


def cpu_quantity(cores: float) -> str:
    return f"{max(1, math.ceil(cores * 1000 / CPU_STEP_MILLI - 1e-9)) * CPU_STEP_MILLI}m"


def _status(current: str | None, recommended: str | None) -> str:
    if recommended is None:
        return "not enough devices measured"
    if current is None:
        return "unset"
    now, wanted = parse_quantity(current), parse_quantity(recommended)
    if now < wanted:
        return "under-provisioned"
    return "over-provisioned" if now >= OVER_FACTOR * wanted else "ok"


def running_version(records: list[dict]) -> str | None:
    """The version most devices last reported measurements of in the window (ties: the newest);
    None when none did. The one the resources are for: a rejected release's version runs nowhere."""
    from collections import Counter

    latest = {r["device_id"]: str(r.get("version")) for r in records
              if r.get("kind", "status") == "status" and isinstance(r.get("measurements"), dict)}
    if not latest:
        return None
    counts = Counter(latest.values())
    return max(counts, key=lambda v: (counts[v], int(v) if v.isdigit() else -1, v))


def device_figures(records: list[dict], version: str) -> list[DeviceFigures]:
    """Per device, its latest measurements of `version` (status records, as `measured_cost` reads
    them), the inferences it served of it, and the time it was reporting them: from its first
    record of the version in the window to its last (status and inference records alike)."""
    from pipelines.edge.telemetry import parse_timestamp

    latest: dict[str, dict] = {}
    served: dict[str, float] = {}
    span: dict[str, list[datetime]] = {}
    for record in records:  # oldest first
        if str(record.get("version")) != version:
            continue
        device, moment = record["device_id"], parse_timestamp(record["ts"])
        seen = span.setdefault(device, [moment, moment])
        seen[0], seen[1] = min(seen[0], moment), max(seen[1], moment)
        kind = record.get("kind", "status")
        if kind == "status" and isinstance(record.get("measurements"), dict):
            latest[device] = record
        elif kind == "inference":
            served[device] = served.get(device, 0.0) + float(record.get("requests") or 0.0)
    out = []
    for device_id, record in sorted(latest.items()):
        m = record["measurements"]
        number = {k: float(m[k]) if isinstance(m.get(k), (int, float)) else None for k in ("rss_bytes", "cpu_ms",
                                                                                          "wall_ms")}
        inferences = max(0.0, served.get(device_id, 0.0))  # Laplace noise may take a count below zero
        seconds = (span[device_id][1] - span[device_id][0]).total_seconds()
        # Sustained use needs a span to average over: a device seen once says nothing of its rate.
        cores = number["cpu_ms"] * inferences / seconds / 1000 if number["cpu_ms"] is not None and seconds > 0 \
            else None
        burst = min(number["cpu_ms"] / CFS_PERIOD_MS, number["cpu_ms"] / number["wall_ms"]) \
            if number["cpu_ms"] is not None and number["wall_ms"] else None
        out.append(DeviceFigures(device_id=device_id, group=record.get("group") or "unknown",
                                 device_class=record.get("device_class"), rss_bytes=number["rss_bytes"],
                                 cpu_ms=number["cpu_ms"], wall_ms=number["wall_ms"], inferences=round(inferences, 3),
                                 seconds=round(seconds, 3), cores=cores, burst_cores=burst))
    return out


def _current(resources: ResourcesSpec) -> dict[str, str | None]:
    return {f"{section}.{name}": getattr(getattr(resources, section), name)
            for section in ("requests", "limits") for name in ("cpu", "memory")}


def _scope(group: str, devices: list[DeviceFigures], resources: ResourcesSpec, gate_bytes: int | None,
           headroom: float, min_devices: int) -> ScopeRecommendation:
    rss = [d.rss_bytes for d in devices if d.rss_bytes is not None]
    cores = [d.cores for d in devices if d.cores is not None]
    bursts = [d.burst_cores for d in devices if d.cores is not None and d.burst_cores is not None]
    rates = [d.inferences / d.seconds for d in devices if d.cores is not None]
    wanted: dict[str, str | None] = dict.fromkeys(RESOURCES)
    if len(rss) >= min_devices:
        wanted["requests.memory"] = memory_quantity(p95(rss) * headroom)
        wanted["limits.memory"] = memory_quantity(max(max(rss) * MEMORY_LIMIT_FACTOR,
                                                      parse_quantity(wanted["requests.memory"]), gate_bytes or 0))
    if len(cores) >= min_devices:
        wanted["requests.cpu"] = cpu_quantity(p95(cores) * headroom)
        wanted["limits.cpu"] = cpu_quantity(max(parse_quantity(wanted["requests.cpu"]) * CPU_LIMIT_FACTOR,
                                                p95(bursts) or 0.0))
    current = _current(resources)
    figures = [Figure(resource=r, current=current[r], recommended=wanted[r], status=_status(current[r], wanted[r]))
               for r in RESOURCES]
    short = [f"{what} from {n} device{'s' if n != 1 else ''}" for what, n in (("memory", len(rss)), ("cpu", len(cores)))
             if n < min_devices]
    note = f"not enough devices measured: {', '.join(short)} (at least {min_devices})" if short else None
    return ScopeRecommendation(
        group=group, devices=len(devices), memory_devices=len(rss), cpu_devices=len(cores),
        rss_p95_bytes=p95(rss), rss_max_bytes=max(rss) if rss else None,
        cpu_cores_p95=None if not cores else round(p95(cores), 6),
        cpu_cores_max=None if not cores else round(max(cores), 6),
        burst_cores_p95=None if not bursts else round(p95(bursts), 6),
        inferences_per_second_p95=None if not rates else round(p95(rates), 3), gate_memory_bytes=gate_bytes,
        current={k: v for k, v in current.items() if v is not None}, figures=figures, note=note)


def recommend(model: str, since: datetime, until: datetime, settings: Settings | None = None,
              headroom: float = HEADROOM, min_devices: int = MIN_DEVICES, spec: ModelSpec | None = None) -> Rightsizing:
    """The recommended resources of each device group of the model's spec (and spec-wide) from
    what its devices measured of the released version over [since, until)."""
    from pipelines.edge.telemetry import read_records
    from pipelines.release import latest_summary
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    if not headroom >= 1.0 or not math.isfinite(headroom) or headroom > 10:
        raise RightsizingError(f"headroom {headroom!r} must lie in [1, 10]")
    if min_devices < 1:
        raise RightsizingError(f"min_devices {min_devices!r} must be at least 1")
    summary = latest_summary(model, settings)
    if summary is None:
        raise RightsizingError(f"{model}: not released yet; release the model first")
    if spec is None:
        from pipelines.operate.monitor import spec_path_of
        from pipelines.specs import load_spec

        try:
            spec = load_spec(spec_path_of(model, settings))
        except KeyError as error:
            raise RightsizingError(error.args[0]) from None
    # The same reading of the window as the actual cost's (pipelines.operate.actual_cost).
    records = read_records(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), model, since, until)
    version = running_version(records) or str(summary.model_version)
    devices = device_figures(records, version)
    gate = {g["group"]: int(g["memory_bytes"]) for g in (summary.cost or {}).get("groups", [])}
    groups = [_scope(t.name, [d for d in devices if d.group == t.name], t.resources_over(spec.resources),
                     gate.get(t.name), headroom, min_devices) for t in spec.targets]
    targeted = {t.name for t in spec.targets}
    spec_wide = _scope(SPEC_WIDE, [d for d in devices if d.group in targeted], spec.resources,
                       max(gate.values()) if gate else None, headroom, min_devices)
    return Rightsizing(model=model, version=version, gate_version=str(summary.model_version),
                       since=since.isoformat(timespec="seconds"),
                       until=until.isoformat(timespec="seconds"), headroom=headroom, min_devices=min_devices,
                       rule=rule_text(headroom, min_devices), groups=groups, spec_wide=spec_wide, devices=devices)


def evidence_key(model: str, now: datetime) -> str:
    moment = now.astimezone(timezone.utc)  # to the millisecond: two runs in one second keep both
    return f"finops/{model}/rightsizing/{moment:%Y%m%dT%H%M%S}.{moment.microsecond // 1000:03d}Z.json"


def write_evidence(result: Rightsizing, settings: Settings, now: datetime | None = None) -> Rightsizing:
    """Keep the recommendation (and its proposal, if any) in the artifact store; the result with its URI."""
    from pipelines.storage import ObjectStore

    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    key = evidence_key(result.model, now or datetime.now(timezone.utc))
    result = result.model_copy(update={"evidence": store.uri(key)})
    store.put_bytes(result.model_dump_json(indent=1).encode(), key)
    return result


# -- the spec as text ------------------------------------------------------------------------
def _last_line(node) -> int:
    """The last line (0-based) holding text of a composed YAML node."""
    import yaml

    if isinstance(node, yaml.MappingNode) and node.value and not node.flow_style:
        return _last_line(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and node.value and not node.flow_style:
        return _last_line(node.value[-1])
    end = node.end_mark
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _flow(values: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in values.items()) + "}"


def _scalar(value: str) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return text


def edit_spec_text(text: str, source: str, changes: dict[str, dict[str, dict[str, str]]]) -> str:
    """`text` (a spec file) with each group's `targets[].resources` given `changes` (section ->
    name -> quantity) over what the group already sets. Only the lines of those blocks change:
    comments and key order elsewhere stay. The result is checked: it must load as the same
    document but for those blocks, and validate as a spec."""
    import yaml

    from pipelines.specs import SpecError, parse_spec

    before = yaml.safe_load(text)
    root = yaml.compose(text)
    targets = next((v for k, v in root.value if k.value == "targets"), None) if isinstance(root, yaml.MappingNode) \
        else None
    if not isinstance(targets, yaml.SequenceNode) or targets.flow_style:
        raise RightsizingError(f"{source}: targets: not a block sequence; edit it by hand")
    lines = text.splitlines(keepends=True)
    edits = []  # (first line, last line or None to insert after `first`, new lines)
    expected = json.loads(json.dumps(before))
    for index, item in enumerate(targets.value):
        if not isinstance(item, yaml.MappingNode):
            continue
        keys = {k.value: (k, v) for k, v in item.value}
        name = keys.get("name", (None, None))[1]
        if name is None or name.value not in changes:
            continue
        if item.flow_style:
            raise RightsizingError(f"{source}: targets[{name.value}]: a flow mapping; edit it by hand")
        own = (before["targets"][index].get("resources") or {}) if isinstance(before["targets"][index], dict) else {}
        merged = {section: {**(own.get(section) or {}), **changes[name.value].get(section, {})}
                  for section in ("requests", "limits")}
        merged = {s: {k: merged[s][k] for k in ("cpu", "memory") if k in merged[s]} for s in merged if merged[s]}
        expected["targets"][index]["resources"] = merged
        indent = " " * item.value[0][0].start_mark.column
        block = [f"{indent}resources:\n"] + [f"{indent}  {section}: {_flow(values)}\n"
                                             for section, values in merged.items()]
        if "resources" in keys:
            key, value = keys["resources"]
            edits.append((key.start_mark.line, _last_line(value), block))
        else:
            edits.append((_last_line(item), None, block))
    missing = set(changes) - {t.get("name") for t in before.get("targets") or [] if isinstance(t, dict)}
    if missing:
        raise RightsizingError(f"{source}: targets: no group named {', '.join(sorted(missing))}")
    for first, last, block in sorted(edits, reverse=True):
        if last is None:
            if first + 1 <= len(lines) and lines[first] and not lines[first].endswith("\n"):
                lines[first] += "\n"
            lines[first + 1:first + 1] = block
        else:
            lines[first:last + 1] = block
    edited = "".join(lines)
    if yaml.safe_load(edited) != expected:
        raise RightsizingError(f"{source}: targets: the edited spec does not read back as intended; edit it by hand")
    try:
        parse_spec(expected, source)
    except SpecError as error:
        raise RightsizingError(str(error)) from None
    return edited


# -- the review branch -------------------------------------------------------------------------
def _spec_path(clone: Path, folder: str, model: str) -> str | None:
    base = Path(folder.strip("/") or ".")
    for rel in (base / f"{model}.yaml", base / model / f"{model}.yaml"):
        if (clone / rel).is_file():
            return rel.as_posix()
    return None


def commit_message(result: Rightsizing, changes: dict) -> str:
    lines = [f"rightsize({result.model}): resources of {', '.join(changes)} from measured p95", "",
             f"Measured on the devices running v{result.version} from {result.since} to {result.until}.",
             f"Rule: {result.rule}.", ""]
    for scope in result.groups:
        if scope.group not in changes:
            continue
        lines.append(f"{scope.group}: memory p95 {_mib(scope.rss_p95_bytes)}, max {_mib(scope.rss_max_bytes)} "
                     f"({scope.memory_devices} devices); cpu p95 {_cores(scope.cpu_cores_p95)}, burst p95 "
                     f"{_cores(scope.burst_cores_p95)} ({scope.cpu_devices} devices); memory gate "
                     f"{_mib(scope.gate_memory_bytes)}")
        for f in scope.figures:
            if f.status in ("over-provisioned", "under-provisioned", "unset"):
                lines.append(f"  {f.resource}: {f.current or 'unset'} -> {f.recommended} ({f.status})")
    lines += ["", *([f"Evidence: {result.evidence}"] if result.evidence else []), f"By {BY}"]
    return "\n".join(lines) + "\n"


def propose(model: str, since: datetime, until: datetime, settings: Settings | None = None,
            headroom: float = HEADROOM, min_devices: int = MIN_DEVICES, now: datetime | None = None) -> Rightsizing:
    """Recommend against the spec as the specs repository's main branch holds it, keep the
    evidence, and push the figures that are not ok to `rightsize/<model>/<date>` for review.
    The main branch is only read. An identical change already on a `rightsize/<model>/*`
    branch is not pushed again."""
    from pipelines.gitops import repo
    from pipelines.specs import SpecError, parse_spec

    settings = settings or get_settings()
    if not settings.specs_remote:
        raise RightsizingError("EDGE_SPECS_REMOTE is not set: the Git URL of the specs repository to propose to")
    now = now or datetime.now(timezone.utc)
    branch, review = settings.specs_remote_branch, f"rightsize/{model}/{now:%Y-%m-%d}"
    remote = repo._resolve(settings.specs_remote)
    shown = repo.redact(settings.specs_remote)
    with repo._opened(remote, settings.work_dir / "specs") as clone:
        repo._sync(clone, branch)
        path = _spec_path(clone, settings.specs_remote_dir, model)
        if path is None:
            raise RightsizingError(f"{model}: no spec {settings.specs_remote_dir}/{model}.yaml on {branch} of {shown}")
        text = (clone / path).read_text(encoding="utf-8")
        import yaml

        try:
            spec = parse_spec(yaml.safe_load(text), path)
        except (SpecError, yaml.YAMLError) as error:
            raise RightsizingError(f"{path}: {error}" if isinstance(error, yaml.YAMLError) else str(error)) from None
        result = recommend(model, since, until, settings, headroom, min_devices, spec)
        from pipelines.storage import ObjectStore

        # The commit names the evidence, written once the proposal's outcome is known.
        result = result.model_copy(update={"evidence": ObjectStore(settings.store_url, settings.s3_endpoint_url).uri(
            evidence_key(model, now))})
        changes = result.changes()
        if not changes:
            return write_evidence(result.model_copy(update={"proposal": Proposal(
                status="nothing to change", path=path, remote=shown)}), settings, now)
        edited = edit_spec_text(text, path, changes)
        written = {group: yaml.safe_load(edited)["targets"][[t.name for t in spec.targets].index(group)]["resources"]
                   for group in changes}
        # The same change already waiting for review on a rightsize branch: nothing to push.
        heads = repo._git("ls-remote", "--heads", "origin", f"refs/heads/rightsize/{model}/*", cwd=clone).stdout
        for line in heads.splitlines():
            sha, ref = line.split("\t")
            repo._git("fetch", "-q", "origin", f"+{ref}:refs/remotes/origin/{ref.removeprefix('refs/heads/')}",
                      cwd=clone)
            proposed = repo._git("show", f"{sha}:{path}", cwd=clone, check=False)
            if proposed.returncode == 0 and proposed.stdout == edited:
                return write_evidence(result.model_copy(update={"proposal": Proposal(
                    status="already proposed", branch=ref.removeprefix("refs/heads/"), commit=sha, path=path,
                    remote=shown, changes=written)}), settings, now)
        if any(line.split("\t")[-1] == f"refs/heads/{review}" for line in heads.splitlines()):
            # Today's branch is this tool's, rewritten when the figures change; a person's commit
            # on it is never overwritten.
            last = repo._git("log", "-1", "--format=%B", f"refs/remotes/origin/{review}", cwd=clone).stdout
            if not last.rstrip().endswith(f"By {BY}"):
                raise repo.GitError(f"{review} has commits of someone else; nothing pushed (merge or delete it)")
        (clone / path).write_text(edited, encoding="utf-8")
        repo._git("add", "--", path, cwd=clone)
        author = (settings.git_author_name, settings.git_author_email)
        repo._git("commit", "-q", "--no-verify", "-F", "-", cwd=clone, input=commit_message(result, changes),
                  env=repo._author_env(author))
        pushed = repo._git("push", "-q", "--force", "origin", f"HEAD:refs/heads/{review}", cwd=clone, check=False)
        if pushed.returncode != 0:
            raise repo.GitError(repo.redact(f"git push to origin/{review} failed: {pushed.stderr.strip()[-2000:]}"))
        commit = repo.head(clone)
        repo._sync(clone, branch)  # leave the clone at the main branch's tip
    return write_evidence(result.model_copy(update={"proposal": Proposal(
        status="pushed", branch=review, commit=commit, path=path, remote=shown, changes=written)}), settings, now)
