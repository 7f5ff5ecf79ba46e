"""Command line: `python -m pipelines release SPEC [--json]` and friends.

Exit codes: 0 success, 2 bad input (spec, data, arguments), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.errors import one_line
from pipelines.specs import SpecError


def _federated_lines(federated) -> list[str]:
    """A federated model's training in two lines: the federation and its worst-served client,
    then the differential privacy it spent."""
    if federated is None:
        return []
    worst = federated.worst_client
    lines = [f"  federated       {federated.strategy}, {federated.rounds} rounds, {federated.clients} clients "
             f"({federated.federation})"
             + (f"; worst client {worst['client']}" + (f" ({worst['group']})" if worst.get("group") else "")
                + f": accuracy {worst['accuracy']:.4f} on its own rows" if worst else "")]
    dp = federated.privacy
    lines.append(f"  privacy         DP-SGD: epsilon {dp.epsilon:.2f}, delta {dp.delta:g} for one example of a "
                 f"client (noise {dp.noise_multiplier:g}, clipping {dp.max_grad_norm:g})" if dp else
                 "  privacy         no differential privacy: clients share exact weight updates")
    return lines


def _table(summary) -> str:
    """The release summary as a readable table: the shipped variant's figures first, money as
    every page shows it (`pipelines.records.usd`)."""
    from pipelines.gates.card import shipped_label
    from pipelines.records import usd

    status = {"released": "RELEASED", "in_review": "IN REVIEW: committed to a review branch",
              "rejected": "REJECTED: nothing was committed",
              "awaiting_approval": "WAITING FOR APPROVAL: nothing committed yet",
              "dry_run": "DRY RUN: nothing was published or committed"}[summary.status]
    lines = [
        f"Release of {summary.model}: {status}",
        f"  model version   {summary.model_version}  (MLflow run {summary.run_id})",
        f"  artifact        {summary.artifact_uri or '(not published)'}",
        f"  sha256          {summary.artifact_sha256}",
    ]
    if summary.gitops_commit:
        lines.append(f"  gitops commit   {summary.gitops_commit}"
                     + ("" if summary.gitops_commit_created else "  (unchanged: already released)"))
    if summary.model_card_uri:
        lines.append(f"  model card      {summary.model_card_uri}")
    if summary.approval:
        verb = "approved" if summary.approval.approved else "rejected"
        lines.append(f"  approval        {verb} by {summary.approval.by} at {summary.approval.at}")
    options = summary.options
    asked = [name for name, on in (("force_retrain", options.force_retrain), ("dry_run", options.dry_run),
                                   ("approval=manual", options.approval == "manual")) if on]
    lines += [
        f"  task            {summary.task}",
        *([f"  imported from   {summary.model_source.get('resolved') or summary.model_source.get('source')}"
           + (f"  (sha256 {summary.model_source['sha256'][:16]}…)" if "sha256" in summary.model_source else "")]
          if summary.model_source else []),
        *_federated_lines(summary.federated),
        f"  trigger         {summary.trigger}",
        *([f"  parameters      {', '.join(asked)}"] if asked else []),
    ]
    # The headline figures are the shipped variant's; the native model's follow as its own.
    metrics = [(shipped_label(v.model_dump()), v.metrics) for v in summary.shipped]
    metrics.append(("native model", summary.metrics))
    lines += [f"  {'' if i else 'metrics':<16}{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
              for i, (label, values) in enumerate(metrics)]
    if summary.cost:
        cost = summary.cost
        lines.append(f"  cost            {usd(cost['total_usd_per_month'])}/month (training "
                     f"{usd(cost['training_usd_per_month'])}), budget {usd(cost['monthly_budget_usd'])}")
    if summary.reasons:
        heading = "  dry run:" if summary.status == "dry_run" else "  why not released:"
        lines += ["", heading] + [f"    - {reason}" for reason in summary.reasons]
    if summary.verdicts:
        lines += ["", "  gate                  result   reason"]
        for v in summary.verdicts:
            result = "waived" if v.waived else ("pass" if v.passed else "FAIL")
            lines.append(f"  {v.gate:<21} {result:<8} {v.reason}")
    if summary.cost:
        from pipelines.finops.cost import CostEstimate, cost_table, diff_lines

        lines += ["", "  edge cost per month (estimate; device figures marked as assumptions in the catalog)"]
        lines += cost_table(CostEstimate.model_validate(summary.cost))
        lines += ["  " + line for line in diff_lines(summary.cost_diff)]
    lines += ["", f"  variant   size (bytes)   {summary.quantization.metric:>8}   Δ vs fp32   p50 ms   p95 ms   eligible"]
    for c in summary.quantization.candidates:
        mark = "*" if c.variant == summary.quantization.chosen else " "
        lines.append(
            f"{mark} {c.variant:<8}{c.size_bytes:>14,}   {c.accuracy:>8.4f}   {c.accuracy_change:>+9.4f}"
            f"   {c.latency_p50_ms:>6.3f}   {c.latency_p95_ms:>6.3f}   {'yes' if c.eligible else 'no: ' + c.note}"
        )
    lines += ["", f"  chosen: {summary.quantization.chosen}: {summary.quantization.reason}", "",
              "  stage            seconds"]
    lines += [f"  {name:<16} {seconds:>7.2f}" for name, seconds in summary.stages.items()]
    lines.append(f"  {'total':<16} {sum(summary.stages.values()):>7.2f}")
    return "\n".join(lines)


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k=v` as a dict; ValueError (one line) on bad syntax or a repeated key."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or any(c.isspace() for c in key + value):
            raise ValueError(f"{item!r} is not key=value")
        if key in labels:
            raise ValueError(f"label {key!r} is given twice")
        labels[key] = value
    return labels


def _model_spec(model: str) -> Path | None:
    """The spec file of a model in the specs folder, or None after printing why not."""
    from pipelines.operate.monitor import spec_path_of

    try:
        return spec_path_of(model)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return None


def _finops_calibrate(args) -> int:
    from datetime import datetime, timedelta, timezone

    from pipelines.operate.catalog_corrections import propose_corrections, save_proposal

    if not 0 < args.hours <= 24 * 90:
        print("error: --hours must lie in (0, 2160]", file=sys.stderr)
        return 2
    if args.min_devices < 1:
        print("error: --min-devices must be >= 1", file=sys.stderr)
        return 2
    for model in args.models:
        if _model_spec(model) is None:
            return 2
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        print(f"error: --output {args.output}: not a file in an existing folder", file=sys.stderr)
        return 2
    until = datetime.now(timezone.utc)
    proposal = save_proposal(propose_corrections(until - timedelta(hours=args.hours), until,
                                                 models=args.models or None, min_devices=args.min_devices))
    if args.output is not None:
        args.output.write_text(proposal.catalog_yaml)
    print(proposal.model_dump_json(exclude={"catalog_yaml"}) if args.json else "\n".join(
        proposal.lines() + ([f"  proposed catalog written to {args.output}"] if args.output else [])))
    return 0


def _finops_rightsize(args) -> int:
    """Print the recommendation and keep it as evidence; with --propose, push it for review."""
    import math
    from datetime import datetime, timedelta, timezone

    from pipelines.gitops.git import GitError
    from pipelines.operate.rightsizing import RightsizingError, propose, recommend, write_evidence
    from pipelines.settings import get_settings

    numbers = {}
    for flag, text, kind, low, high in (("--hours", args.hours, float, 0, 24 * 90), ("--headroom", args.headroom,
                                        float, 1, 10), ("--min-devices", args.min_devices, int, 1, 100_000)):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high or (flag == "--hours" and not value):
            print(f"error: {flag}: {text!r} is not a {'whole ' if kind is int else ''}number in "
                  f"{'(' if flag == '--hours' else '['}{low}, {high}]", file=sys.stderr)
            return 2
        numbers[flag] = value
    settings = get_settings()
    if args.propose and not settings.specs_remote:
        print("warning: --propose: EDGE_SPECS_REMOTE (the Git URL of the specs repository) is not set: the "
              "recommendation is only printed and kept as evidence", file=sys.stderr)
    until = datetime.now(timezone.utc)
    since = until - timedelta(hours=numbers["--hours"])
    try:
        if args.propose and settings.specs_remote:
            result = propose(args.model, since, until, settings, numbers["--headroom"], numbers["--min-devices"])
        else:
            result = write_evidence(recommend(args.model, since, until, settings, numbers["--headroom"],
                                              numbers["--min-devices"]), settings)
    except RightsizingError as error:
        print(f"error: {one_line(error, 500)}", file=sys.stderr)
        return 2
    except GitError as error:
        print(f"error: {args.model}: specs repository: {one_line(error, 500)}", file=sys.stderr)
        return 1
    print(result.model_dump_json() if args.json else "\n".join(result.lines()))
    return 0


def _edge_agent(args) -> int:
    """Poll once (exit 1 if a model failed, was refused or is stale) or forever every --interval s."""
    import time

    from pipelines.edge.agent import AgentBusy, EdgeAgent
    from pipelines.edge.desired import SourceError
    from pipelines.edge.desired_state import EntryError, check_name
    from pipelines.gitops.signing import PUBLIC_KEY_NAME
    from pipelines.settings import get_settings

    try:
        labels = parse_labels(args.labels)
    except ValueError as error:
        print(f"error: --labels: {error}", file=sys.stderr)
        return 2
    try:
        check_name(args.device_id, "device id")
        if args.group is not None:
            check_name(args.group, "device group")
    except (ValueError, EntryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.interval is not None and args.interval <= 0:
        print("error: --interval must be positive", file=sys.stderr)
        return 2
    settings = get_settings()
    state = args.state or settings.state / "agents" / args.device_id
    # A device never makes keys: the release public key and the TUF root are provisioned.
    public_key = args.public_key or settings.signing_public_key or settings.state / "keys" / PUBLIC_KEY_NAME
    if not Path(public_key).is_file():
        print(f"error: --public-key: {public_key} does not exist (the device's trusted release key)", file=sys.stderr)
        return 2
    try:
        source = _agent_source(args, settings, state, public_key)
        agent = EdgeAgent(args.device_id, labels, state, source, public_key, settings.telemetry_url,
                          settings.s3_endpoint_url, lock_wait_s=args.lock_wait)
    except (AgentBusy, SourceError, ValueError, OSError) as error:
        print(f"error: {args.device_id}: {error}", file=sys.stderr)
        return 2
    bad = ("failed", "refused", "stale")
    try:
        while True:
            try:
                results = agent.poll_once()
            except AgentBusy as error:
                print(f"error: {args.device_id}: {error}", file=sys.stderr)
                return 2
            for result in results:
                print(result.line(), flush=True)
            if args.interval is None:
                return 1 if any(r.state in bad for r in results) else 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _agent_source(args, settings, state: Path, public_key: Path):
    """The agent's desired-state source: the TUF repository (default) or the GitOps repository."""
    from pipelines.edge.sources import GitDesiredState, TufDesiredState

    if args.source == "git":
        return GitDesiredState(settings.remote, settings.gitops_branch, state / "gitops", settings.store_url,
                               public_key, settings.s3_endpoint_url)
    if not args.group:
        raise ValueError("--group is required with --source tuf (the device group it was provisioned in)")
    root = args.trusted_root or state / "root.json"
    if not Path(root).is_file():
        raise ValueError(f"--trusted-root: {root} does not exist (the TUF root the device was provisioned with)")
    return TufDesiredState(args.tuf_url or settings.device_tuf_url, args.group, state, Path(root).read_bytes())


def _tuf_command(args) -> int:
    from pipelines.edge import publish
    from pipelines.edge.tuf_repo import TufError
    from pipelines.settings import get_settings

    settings = get_settings()
    try:
        if args.command == "tuf-init":
            keys = settings.tuf_keys()
            root = args.root_key or keys["root"]
            if root is None:
                print("error: --root-key: the root key is needed to create the repository", file=sys.stderr)
                return 2
            repository = publish.repository(settings)
            if repository.exists():
                print(f"error: a TUF repository already exists at {settings.store_url}/{settings.tuf_prefix}",
                      file=sys.stderr)
                return 2
            repository.initialize([root], keys["targets"], keys["snapshot"], keys["timestamp"])
            print(f"created the TUF repository at {settings.store_url}/{settings.tuf_prefix}")
        elif args.command == "tuf-root":
            args.output.write_bytes(publish.ensure_repository(settings).trusted_root())
            print(f"wrote {args.output}")
        elif args.command == "tuf-rotate":
            keys = settings.tuf_keys()
            root = args.root_key or keys["root"]
            if root is None:
                print("error: --root-key: the current root key is needed to sign a new root", file=sys.stderr)
                return 2
            replace = {role: getattr(args, f"new_{role}_key") for role in ("snapshot", "timestamp")
                       if getattr(args, f"new_{role}_key")}
            version = publish.repository(settings).rotate_root(
                [root], [args.new_root_key] if args.new_root_key else None, replace=replace,
                snapshot_key=replace.get("snapshot", keys["snapshot"]),
                timestamp_key=replace.get("timestamp", keys["timestamp"]), targets_key=keys["targets"])
            changed = ", ".join(["root"] * bool(args.new_root_key) + sorted(replace)) or "nothing (expiry renewed)"
            print(f"root v{version} signed; new keys: {changed}")
        elif args.refresh_only:
            print(publish.refresh_timestamp(settings).line())
        else:
            result = publish.publish_desired_state(settings)
            print(result.model_dump_json() if args.json else "\n".join(result.lines()))
    except (TufError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _retention(args) -> int:
    """Plan the audit retention at --now (or now) and apply it, or only print it (--dry-run)."""
    from datetime import datetime, timezone

    from pipelines.operate.retention import apply_retention
    from pipelines.settings import get_settings
    from pipelines.storage import StoreError

    try:
        now = datetime.fromisoformat(args.now) if args.now else datetime.now(timezone.utc)
    except ValueError:
        print(f"error: --now: {args.now!r} is not an ISO time (2027-01-31T00:00:00Z)", file=sys.stderr)
        return 2
    try:
        result = apply_retention(get_settings(), now, dry_run=args.dry_run)
    except StoreError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    return 1 if result.refused else 0


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _feedback(args) -> int:
    """Store a file of labels for the model's sampled inferences; exit 2 naming the bad row."""
    import getpass
    from datetime import datetime, timezone

    from pipelines.operate.feedback import FeedbackError, check_rows, model_task, read_file, store_labels
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    spec_path = _model_spec(args.model)
    if spec_path is None:
        return 2
    settings = get_settings()
    try:
        rows = check_rows(read_file(args.file), model_task(spec_path, settings), str(args.file))
    except FeedbackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    receipt = store_labels(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), args.model, rows,
                           datetime.now(timezone.utc), by=getpass.getuser())
    print(f"{args.model}: {receipt.labels:,} labels stored ({receipt.key}, received {receipt.received_at})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pipelines", description="Edge AI release pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    release = commands.add_parser("release", help="run one release of a model spec, without Airflow")
    release.add_argument("spec", type=Path, help="path to a model spec YAML file")
    release.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    release.add_argument("--trigger", default="cli", help="what started the release (recorded in MLflow)")
    release.add_argument("--approve-as", metavar="NAME", default=None,
                         help="approve a release whose spec asks for manual approval, as NAME")
    release.add_argument("--reason", default="", help="why this release is started (recorded in MLflow)")
    release.add_argument("--force-retrain", action="store_true",
                         help="retrain and re-run every stage even if these data, spec and code were released")
    release.add_argument("--approval", choices=["spec", "manual"], default="spec",
                         help="manual: ask for a person's approval even when the spec says auto "
                              "(no value relaxes a manual spec)")
    release.add_argument("--dry-run", action="store_true",
                         help="stop after the decision: nothing is published or committed")
    check = commands.add_parser("validate-spec", help="validate model spec files")
    check.add_argument("specs", type=Path, nargs="+")
    summary = commands.add_parser("summary", help="print the latest release summary of a model")
    summary.add_argument("model")
    summary.add_argument("--json", action="store_true")
    summary.add_argument("--dry-run", action="store_true", help="the latest dry run's summary instead")
    back = commands.add_parser("rollback", help="put a model's previous release back (a GitOps commit)")
    back.add_argument("model")
    back.add_argument("--to", default=None, help="version (3 or v3) or commit sha; default: the previous version")
    back.add_argument("--reason", required=True, help="why (recorded in the commit and in MLflow)")
    back.add_argument("--by", default=None, help="who (default: the current user)")
    mon = commands.add_parser("monitor", help="compare a model's recent telemetry with its training reference")
    mon.add_argument("model")
    mon.add_argument("--json", action="store_true")
    roll = commands.add_parser("rollout", help="analyse a model's canary and advance, hold or roll it back")
    roll.add_argument("model")
    roll.add_argument("--dry-run", action="store_true", help="analyse and print, commit nothing")
    roll.add_argument("--resume", action="store_true", help="lift a hold on the canary (a commit)")
    roll.add_argument("--by", default=None, help="who resumes (default: the current user)")
    feedback = commands.add_parser("feedback", help="send labels of sampled inferences (ground truth from the field)")
    feedback.add_argument("model")
    feedback.add_argument("file", type=Path, help="CSV with the header inference_id,label, or JSON lines")
    quality = commands.add_parser("quality", help="judge a model's quality and fairness on labelled field inferences")
    quality.add_argument("model")
    quality.add_argument("--no-act", action="store_true", help="judge and record only; run no onBreach action")
    quality.add_argument("--json", action="store_true")
    finops = commands.add_parser("finops-report", help="forecast a released model's spend for 30 days")
    finops.add_argument("model")
    finops.add_argument("--as-of", default=None, help="ISO date the forecast starts (default: today, UTC)")
    finops.add_argument("--json", action="store_true")
    finops.add_argument("--act", action="store_true", help="on a breach, run the spec's finops.onBreach (commits)")
    actual = commands.add_parser("finops-actual", help="a released model's actual cost from device telemetry, "
                                                       "next to its estimate")
    actual.add_argument("model")
    actual.add_argument("--hours", type=float, default=24.0, help="the window, ending now (default: 24)")
    actual.add_argument("--json", action="store_true")
    rightsize = commands.add_parser("finops-rightsize", help="recommended resources per device group from what "
                                                             "the devices measured (--propose: a review branch)")
    rightsize.add_argument("model")
    rightsize.add_argument("--hours", default="168", help="the window, ending now (default: 168)")
    rightsize.add_argument("--headroom", default="1.2", help="requests = p95 x this (default: 1.2)")
    rightsize.add_argument("--min-devices", default="5", help="fewer devices measured: no figure (default: 5)")
    rightsize.add_argument("--json", action="store_true")
    rightsize.add_argument("--propose", action="store_true",
                           help="push the spec change to rightsize/<model>/<date> of $EDGE_SPECS_REMOTE for review")
    calibrate = commands.add_parser("finops-calibrate", help="propose corrections of the device catalog from what "
                                                             "devices measured (for review; nothing is applied)")
    calibrate.add_argument("models", nargs="*", help="models to learn from (default: every released model)")
    calibrate.add_argument("--hours", type=float, default=168.0, help="the window, ending now (default: 168)")
    calibrate.add_argument("--min-devices", type=int, default=20,
                           help="fewer devices behind a figure: it is not corrected (default: 20)")
    calibrate.add_argument("--output", type=Path, default=None, help="also write the proposed catalog to this file")
    calibrate.add_argument("--json", action="store_true")
    restore = commands.add_parser("finops-restore", help="commit the spec's telemetry sample rate and the release's "
                                                         "variant per device group back (undoes lower_sampling and "
                                                         "cheaper_variant)")
    restore.add_argument("model")
    restore.add_argument("--by", default=None, help="who (default: the current user)")
    schema = commands.add_parser("schema", help="write the JSON schema of model specs")
    schema.add_argument("--output", type=Path, default=None)
    agent = commands.add_parser("edge-agent", help="reconcile one device with the signed desired state")
    agent.add_argument("--device-id", required=True)
    agent.add_argument("--labels", required=True, help="the device's labels: k=v,k=v")
    agent.add_argument("--group", default=None, help="the device group it was provisioned in (TUF source)")
    agent.add_argument("--source", choices=["tuf", "git"], default="tuf",
                       help="tuf: the TUF repository (default); git: the GitOps repository's attested manifests")
    agent.add_argument("--tuf-url", default=None, help="default: $EDGE_TUF_URL, or the local store's repository")
    agent.add_argument("--trusted-root", type=Path, default=None,
                       help="the TUF root.json the device was provisioned with (default: <state>/root.json)")
    agent.add_argument("--public-key", type=Path, default=None,
                       help="the release public key (default: $EDGE_SIGNING_PUBLIC_KEY or the demo key)")
    agent.add_argument("--lock-wait", type=float, default=10.0, metavar="S",
                       help="wait S seconds for another agent on the same folder, then exit 2")
    agent.add_argument("--state", type=Path, default=None,
                       help="the device's folder (default: <state>/agents/<device-id>)")
    when = agent.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="poll once and exit (the default)")
    when.add_argument("--interval", type=float, default=None, metavar="S", help="poll every S seconds")
    fleet = commands.add_parser("fleet", help="simulate a fleet of edge agents")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    simulate = fleet_commands.add_parser("simulate", help="run N agents for R rounds and print convergence")
    simulate.add_argument("--devices", type=int, required=True)
    simulate.add_argument("--rounds", type=int, default=3)
    simulate.add_argument("--keep", action="store_true",
                          help="continue with the devices of the last simulation (they keep what they run)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--serve", type=int, default=0, metavar="N",
                          help="after each round, every device runs N requests per active model and reports them")
    simulate.add_argument("--fault", action="append", default=[], metavar="SPEC",
                          help="inject a fault: e.g. version=2,error_rate=0.2 / group=branch-kiosks,latency_ms=40 / "
                               "shift=age:+20;hours_per_week:+10 (repeatable)")
    simulate.add_argument("--source", choices=["tuf", "git"], default="tuf",
                          help="tuf: each device reads the TUF repository (default); git: a clone per device")
    publish = commands.add_parser("publish-desired-state",
                                  help="publish the GitOps tip as signed desired state (TUF repository)")
    publish.add_argument("--refresh-only", action="store_true",
                         help="only sign the timestamp again if it nears expiry")
    publish.add_argument("--json", action="store_true")
    tuf_init = commands.add_parser("tuf-init", help="create the TUF repository (with the offline root key)")
    tuf_init.add_argument("--root-key", type=Path, default=None, help="default: $EDGE_TUF_ROOT_KEY or the demo key")
    rotate = commands.add_parser("tuf-rotate", help="sign a new TUF root: rotate the root key, or revoke and "
                                                    "replace a leaked online key")
    rotate.add_argument("--root-key", type=Path, default=None,
                        help="the current root key (default: $EDGE_TUF_ROOT_KEY or the demo key)")
    rotate.add_argument("--new-root-key", type=Path, default=None, help="replace the root key by this one")
    for role in ("snapshot", "timestamp"):
        rotate.add_argument(f"--new-{role}-key", type=Path, default=None,
                            help=f"revoke the {role} key and trust this one (private PEM; configure it as "
                                 f"EDGE_TUF_{role.upper()}_KEY afterwards)")
    tuf_root = commands.add_parser("tuf-root", help="write the trusted root.json devices are provisioned with")
    tuf_root.add_argument("--output", type=Path, required=True)
    retention = commands.add_parser("retention", help="remove audit records past their retention (retired versions)")
    retention.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    retention.add_argument("--now", default=None, help="ISO time to judge at (default: now, UTC)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pipelines").setLevel(logging.INFO)
    from pipelines.release import ReleaseError

    try:
        if args.command == "release":
            from datetime import datetime, timezone
            from uuid import uuid4

            from pipelines.release import release_options, run_release

            approval = None
            if args.approve_as:
                from pipelines.records import Approval

                approval = Approval(approved=True, by=args.approve_as, at=datetime.now(timezone.utc).isoformat(
                    timespec="seconds"), comment="approved on the command line")
            run_id = f"cli__{datetime.now(timezone.utc).isoformat(timespec='seconds')}__{uuid4().hex[:8]}"
            options = release_options({"reason": args.reason, "force_retrain": args.force_retrain,
                                       "approval": args.approval, "dry_run": args.dry_run}, run_id)
            trigger = f"{args.trigger}: {args.reason}" if args.reason else args.trigger
            result = run_release(args.spec, trigger=trigger, approval=approval, options=options, attempt_id=run_id)
            print(result.model_dump_json() if args.json else _table(result))
        elif args.command == "validate-spec":
            from pipelines.specs import load_spec

            for path in args.specs:
                print(f"{path}: ok ({load_spec(path).name})")
        elif args.command == "summary":
            from pipelines.release import latest_summary

            result = latest_summary(args.model, dry_run=args.dry_run)
            if result is None:
                print(f"{args.model}: no {'dry run' if args.dry_run else 'release'} recorded yet", file=sys.stderr)
                return 2
            print(result.model_dump_json() if args.json else _table(result))
        elif args.command == "rollback":
            import getpass

            from pipelines.gitops.rollback import RollbackError
            from pipelines.operate.rollback import rollback_release

            try:
                result = rollback_release(args.model, args.to, args.reason, args.by or getpass.getuser())
            except RollbackError as error:
                print(f"error: {args.model}: {error}", file=sys.stderr)
                return 2
            print(f"{result.model}: version {result.from_version} -> {result.to_version}, commit {result.commit}")
        elif args.command == "finops-report":
            from datetime import date, datetime, timezone

            from pipelines.operate.finops_report import finops_report

            try:
                as_of = date.fromisoformat(args.as_of) if args.as_of else datetime.now(timezone.utc).date()
            except ValueError:
                print(f"error: --as-of: {args.as_of!r} is not an ISO date (YYYY-MM-DD)", file=sys.stderr)
                return 2
            try:
                report = finops_report(args.model, as_of)
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            if args.act:
                from pipelines.operate.budget import act_on_breach

                spec_path = _model_spec(args.model)
                if spec_path is None:
                    return 2
                for action in act_on_breach(spec_path, report):
                    print(f"finops.onBreach {action.action}: {action.status}: {action.detail}"
                          + (f" (commit {action.commit})" if action.commit else ""), file=sys.stderr)
            if args.json:
                print(report.model_dump_json())
            else:
                from pipelines.settings import get_settings
                from pipelines.storage import ObjectStore

                settings = get_settings()
                store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
                print(store.read_bytes(store.key_of(report.evidence["report.txt"])).decode())
                print("\n".join(f"{name}: {uri}" for name, uri in report.evidence.items()))
        elif args.command == "edge-agent":
            return _edge_agent(args)
        elif args.command == "fleet":
            from pipelines.edge.simulator import format_convergence, parse_fault
            from pipelines.edge.simulator import simulate as simulate_fleet
            from pipelines.settings import get_settings

            if args.devices < 1 or args.rounds < 1 or args.serve < 0:
                print("error: --devices and --rounds must be at least 1, --serve at least 0", file=sys.stderr)
                return 2
            try:
                faults = [parse_fault(text) for text in args.fault]
            except ValueError as error:
                print(f"error: --fault: {error}", file=sys.stderr)
                return 2
            print(format_convergence(simulate_fleet(args.devices, args.rounds, get_settings(), seed=args.seed,
                                                    source=args.source, keep=args.keep, serve=args.serve,
                                                    faults=faults)))
        elif args.command == "monitor":
            from pipelines.operate.monitor import check_drift, format_check

            spec_path = _model_spec(args.model)
            if spec_path is None:
                return 2
            check = check_drift(spec_path)
            print(check.model_dump_json() if args.json else format_check(check))
        elif args.command == "rollout":
            from pipelines.operate.rollout import RolloutError, resume_rollout, step_rollout

            spec_path = _model_spec(args.model)
            if spec_path is None:
                return 2
            if args.resume:
                import getpass

                try:
                    commit = resume_rollout(args.model, args.by or getpass.getuser())
                except RolloutError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
                print(f"{args.model}: canary resumed, commit {commit}")
                return 0
            result = step_rollout(spec_path, dry_run=args.dry_run)
            print("\n".join(result.lines()))
            if result.commit:
                print(f"commit: {result.commit}")
        elif args.command in ("publish-desired-state", "tuf-init", "tuf-root", "tuf-rotate"):
            return _tuf_command(args)
        elif args.command == "retention":
            return _retention(args)
        elif args.command == "finops-calibrate":
            return _finops_calibrate(args)
        elif args.command == "finops-actual":
            from datetime import datetime, timedelta, timezone

            from pipelines.operate.actual_cost import actual_cost

            if not 0 < args.hours <= 24 * 90:
                print("error: --hours must lie in (0, 2160]", file=sys.stderr)
                return 2
            until = datetime.now(timezone.utc)
            try:
                result = actual_cost(args.model, until - timedelta(hours=args.hours), until)
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            print(result.model_dump_json() if args.json else "\n".join(result.lines()))
        elif args.command == "finops-rightsize":
            return _finops_rightsize(args)
        elif args.command == "finops-restore":
            import getpass

            from pipelines.operate.budget import restore_sampling, restore_variants
            from pipelines.operate.commits import ManifestChangeError

            spec_path = _model_spec(args.model)
            if spec_path is None:
                return 2
            by = args.by or getpass.getuser()
            try:
                commit = restore_sampling(spec_path, by)
                variants = restore_variants(args.model, by)
            except ManifestChangeError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            print(f"{args.model}: " + (f"telemetry sampling restored, commit {commit}" if commit
                                       else "telemetry sampling is already the spec's"))
            print(f"{args.model}: " + (f"the release's variants restored, commit {variants}" if variants
                                       else "every device group runs the release's variant"))
        elif args.command == "feedback":
            return _feedback(args)
        elif args.command == "quality":
            from pipelines.operate.quality import check_field_quality

            spec_path = _model_spec(args.model)
            if spec_path is None:
                return 2
            check = check_field_quality(spec_path, act=not args.no_act)
            print(check.model_dump_json() if args.json else "\n".join(check.lines()))
        elif args.command == "schema":
            from pipelines.specs import json_schema

            text = json.dumps(json_schema(), indent=2) + "\n"
            if args.output:
                args.output.write_text(text)
            else:
                print(text, end="")
    except (SpecError, ReleaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
