"""The cost of data size: one whole release of the Adult demo spec at 1x, 10x, 100x its rows.

For each scale N, the 32,561 rows of UCI Adult's training file (`builtin:uci-adult`) are
written N times to one Parquet file. Copy 0 is the original; every later copy gets a small
deterministic jitter (seeded): `age` and `hours_per_week` move by -1, 0 or +1, clipped to the
spec's validation ranges, so no row is invalid and the copies are not plain duplicates. A copy
of `model_specs/adult-income.yaml` whose `data.source` points at that file (name unchanged,
in a folder of its own) is then released by `python -m pipelines release --json` in a new
process on a fresh state folder (embedded defaults: no services). The drift gate's current
window stays `builtin:uci-adult-test`.

The child process runs the command line's own `main` (`pipelines.__main__`), with each stage
wrapped to note the process's RSS high-water mark after it. Per scale: the rows the release
validated, the wall time of the whole release process, seconds per stage (from the release
summary), the peak RSS of the largest process of the releasing process tree (`os.wait4`'s
resource usage of the child, which covers the descendants it waited for), and the stages
that raised the RSS high-water mark most. Targets at 100x: every stage but `train` under
20 s, peak RSS under 3 GB.

    .venv/bin/python bench/data_scale.py                  # 1x and 10x
    .venv/bin/python bench/data_scale.py --scales 1,10,100
    .venv/bin/python bench/data_scale.py --scales 10,100 --profile   # where each stage's time goes

Writes `$EDGE_STATE_DIR/bench/data_scale.json` (default `.edge-state`). With `--profile` each
stage runs under its own cProfile profiler (slower: the seconds are not comparable with a
plain run), one file per scale and stage beside the JSON, and per stage the release library's
functions with the most cumulative time, the functions with the most own time and the time
spent importing are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.settings import get_settings  # noqa: E402

BIN = Path(sys.executable).parent
SPEC = ROOT / "model_specs" / "adult-income.yaml"
JITTER = ("age", "hours_per_week")
COPIES_PER_ROW_GROUP = 10
STAGE_TARGET_S = 20.0
RSS_TARGET_MIB = 3 * 1024
TARGET_SCALE = 100
SEED = 20240601
PROFILE_MIN_S = 1.0


def write_rows(scale: int, path: Path, ranges: dict[str, list[float]]) -> int:
    """The Adult rows `scale` times as one Parquet file; returns the row count."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.builtin import load_uci_adult

    base = load_uci_adult()
    rng = np.random.default_rng(SEED)
    schema = pa.Schema.from_pandas(base, preserve_index=False)
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, scale, COPIES_PER_ROW_GROUP):
            copies = []
            for copy in range(start, min(start + COPIES_PER_ROW_GROUP, scale)):
                frame = base.copy()
                if copy:
                    for column in JITTER:
                        low, high = ranges[column]
                        step = rng.integers(-1, 2, size=len(frame))
                        frame[column] = (frame[column] + step).clip(low, high).astype(base[column].dtype)
                copies.append(frame)
            chunk = pd.concat(copies, ignore_index=True)
            writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
            rows += len(chunk)
    return rows


def _env(state: Path, specs: Path) -> dict[str, str]:
    return {**os.environ, "EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs), "PYTHONWARNINGS": "ignore",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def child_release(spec: str, prefix: str, profile: bool) -> int:
    """`python -m pipelines release SPEC --json` in this process (the CLI's own `main`), with
    the process's RSS high-water mark noted after each stage (`<prefix>-rss.json`) and, with
    `profile`, each stage under its own cProfile profiler (`<prefix>-<stage>.prof`)."""
    import cProfile
    import functools
    import resource

    from pipelines.__main__ import main as cli
    from pipelines.release import gates, stages

    high_water: dict[str, int] = {}

    def wrap(name, fn):
        @functools.wraps(fn)
        def measured(*args, **kwargs):
            profiler = cProfile.Profile() if profile else None
            try:
                return profiler.runcall(fn, *args, **kwargs) if profiler else fn(*args, **kwargs)
            finally:
                high_water[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                if profiler:
                    profiler.dump_stats(f"{prefix}-{name}.prof")
        return measured

    for name in stages.STAGES:
        for module in (stages, gates):
            if callable(getattr(module, name, None)):
                setattr(module, name, wrap(name, getattr(module, name)))
    try:
        return cli(["release", spec, "--json"])
    finally:
        Path(f"{prefix}-rss.json").write_text(json.dumps(high_water))


def hot_spots(prefix: Path, stage: str, top: int = 4) -> list[str]:
    """Where a stage's time goes, from its profile: the release library's functions with the
    most cumulative time (the stage function apart), the functions with the most own time,
    and the time spent importing modules; seconds, share of the stage, file:line."""
    import pstats

    path = Path(f"{prefix}-{stage}.prof")
    if not path.is_file():
        return []
    stats = pstats.Stats(str(path)).stats
    total = max((cum for (_, _, name), (_, _, _, cum, _) in stats.items() if name == stage), default=1e-9)

    def line(key, seconds, what):
        file, number, function = key
        where = file.split("site-packages/")[-1].removeprefix(str(ROOT) + "/")
        if "/lib/python" in where:  # the standard library
            where = where.split("/lib/")[-1]
        return f"    {what:<5}{seconds:7.2f} s {100 * seconds / total:5.1f}%  {where}:{number}({function})"

    library = [(key, value[3]) for key, value in stats.items()
               if key[0].startswith(str(ROOT / "pipelines")) and key[2] != stage and not key[2].startswith("<")]
    own = [(key, value[2]) for key, value in stats.items()]
    imports = max((value[3] for key, value in stats.items() if key[2] == "_find_and_load"), default=0.0)
    lines = [line(key, seconds, "cum") for key, seconds in sorted(library, key=lambda kv: -kv[1])[:top]]
    lines += [line(key, seconds, "own") for key, seconds in sorted(own, key=lambda kv: -kv[1])[:top]]
    lines.append(f"    {'imports':<5}{imports:5.2f} s {100 * imports / total:5.1f}%")
    return lines


def release(spec: Path, env: dict[str, str], log: Path, prefix: Path, profile: bool) -> tuple[float, int, str]:
    """Run one release in a child process: (wall seconds, peak RSS KiB of its tree, stdout)."""
    command = [str(BIN / "python"), str(Path(__file__).resolve()), "--child-release", str(spec), str(prefix),
               *(["--profile"] if profile else [])]
    began = time.perf_counter()
    with log.open("w") as err, subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                                stderr=err, text=True) as child:
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    if child.returncode != 0:
        raise SystemExit(f"release failed ({child.returncode}):\n{(out + log.read_text())[-3000:]}")
    return wall, usage.ru_maxrss, out


def measure(scale: int, work: Path, profile_dir: Path | None) -> dict:
    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    folder = work / f"{scale}x"
    specs, state = folder / "specs", folder / "state"
    specs.mkdir(parents=True)
    data = folder / "adult.parquet"
    began = time.perf_counter()
    rows = write_rows(scale, data, spec["data"]["validation"]["ranges"])
    prepare_s = time.perf_counter() - began
    spec["data"]["source"] = str(data)
    spec_path = specs / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    prefix = (profile_dir or folder) / f"data_scale-{scale}x"
    wall, rss_kib, out = release(spec_path, _env(state, specs), folder / "release.log", prefix, profile_dir is not None)
    high_water = json.loads(Path(f"{prefix}-rss.json").read_text())
    summary = json.loads(out.strip().splitlines()[-1])
    if summary["status"] != "released":
        raise SystemExit(f"{scale}x: {summary['status']} ({summary.get('reasons')})")
    validation = state / "artifacts" / "runs" / spec["name"] / summary["release_key"] / "validation.json"
    validated = json.loads(validation.read_text())["rows"]
    if validated != rows:
        raise SystemExit(f"{scale}x: the release validated {validated:,} rows, {rows:,} were written")
    return {"scale": scale, "rows": rows, "parquet_mib": round(data.stat().st_size / 2**20, 1),
            "prepare_s": round(prepare_s, 2), "wall_s": round(wall, 2), "stages_s": summary["stages"],
            "sum_of_stages_s": round(sum(summary["stages"].values()), 2), "peak_rss_mib": round(rss_kib / 1024),
            "rss_high_water_after_stage_mib": {k: round(v / 1024) for k, v in high_water.items()},
            "profiled": profile_dir is not None, "metrics": summary["metrics"],
            "quantization": summary["quantization"].get("chosen")}


def _over(result: dict) -> list[str]:
    """What misses the targets (they are set for 100x)."""
    over = [f"{stage} {s:.2f} s" for stage, s in result["stages_s"].items() if stage != "train" and s >= STAGE_TARGET_S]
    if result["peak_rss_mib"] >= RSS_TARGET_MIB:
        over.append(f"peak RSS {result['peak_rss_mib']:,} MiB")
    return over


def table(results: list[dict]) -> str:
    width = 12
    head = f"{'':<18}" + "".join(f"{str(r['scale']) + 'x':>{width}}" for r in results) + f"   target at {TARGET_SCALE}x"
    lines = [head, f"{'rows':<18}" + "".join(f"{r['rows']:>{width},}" for r in results),
             f"{'parquet MiB':<18}" + "".join(f"{r['parquet_mib']:>{width}.1f}" for r in results)]
    stages = list(dict.fromkeys(s for r in results for s in r["stages_s"]))
    for stage in stages:
        cells = "".join(f"{r['stages_s'].get(stage, float('nan')):>{width}.2f}" for r in results)
        lines.append(f"  {stage:<16}{cells}   {'-' if stage == 'train' else f'< {STAGE_TARGET_S:.0f} s'}")
    lines.append(f"{'sum of stages s':<18}" + "".join(f"{r['sum_of_stages_s']:>{width}.2f}" for r in results))
    lines.append(f"{'wall (process) s':<18}" + "".join(f"{r['wall_s']:>{width}.2f}" for r in results))
    lines.append(f"{'peak RSS MiB':<18}" + "".join(f"{r['peak_rss_mib']:>{width},}" for r in results)
                 + f"   < {RSS_TARGET_MIB:,}")
    lines.append(f"{'accuracy':<18}" + "".join(f"{r['metrics'].get('accuracy', float('nan')):>{width}.4f}"
                                                for r in results))
    for r in results:
        over = _over(r)
        verdict = "all met" if not over else "over: " + ", ".join(over)
        note = "" if r["scale"] == TARGET_SCALE else f" (targets are for {TARGET_SCALE}x)"
        lines.append(f"{r['scale']}x targets: {verdict}{note}")
    for r in results:
        lines.append(f"{r['scale']}x RSS high-water grows most in: " + ", ".join(
            f"{stage} +{grown:,} MiB" for stage, grown in _rss_growth(r)[:3]))
    if any(r["profiled"] for r in results):
        lines.append("under cProfile: seconds include the profiler's overhead")
    return "\n".join(lines)


def _rss_growth(result: dict) -> list[tuple[str, int]]:
    """Stages by how much they raised the releasing process's RSS high-water mark (MiB), most first."""
    growth, before = [], 0
    for stage, mark in result["rss_high_water_after_stage_mib"].items():
        growth.append((stage if before else f"{stage} (from process start)", mark - before))
        before = mark
    return sorted((g for g in growth if g[1] > 0), key=lambda g: -g[1])


def profile_report(results: list[dict], folder: Path) -> str:
    """Per profiled scale and stage (training apart), where the stage's own time goes."""
    lines = []
    for r in (r for r in results if r["profiled"]):
        for stage in (s for s in r["stages_s"] if s != "train" and r["stages_s"][s] >= PROFILE_MIN_S):
            lines.append(f"{r['scale']}x {stage} ({r['stages_s'][stage]:.2f} s under cProfile):")
            lines += hot_spots(folder / f"data_scale-{r['scale']}x", stage)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,10", help="comma-separated multiples of the 32,561 rows (default 1,10)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each stage with cProfile (files beside the JSON; slower) and print "
                             "where each stage's time goes")
    parser.add_argument("--child-release", nargs=2, metavar=("SPEC", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_release:
        return child_release(*args.child_release, profile=args.profile)
    try:
        scales = [int(s) for s in args.scales.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--scales: {args.scales!r} is not a list of integers")
    if not scales or min(scales) < 1:
        parser.error("--scales: give positive integers")
    out = get_settings().state / "bench" / "data_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-scale-"))
    results = []
    try:
        for scale in scales:
            result = measure(scale, work, out.parent if args.profile else None)
            print(f"{scale}x: {result['rows']:,} rows, release {result['wall_s']:.1f} s, "
                  f"peak RSS {result['peak_rss_mib']:,} MiB (data written in {result['prepare_s']:.1f} s)", flush=True)
            results.append(result)
            shutil.rmtree(work / f"{scale}x", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.profile:
        print(profile_report(results, out.parent))
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "jitter": {"columns": list(JITTER), "step": [-1, 0, 1], "seed": SEED, "first_copy": "unchanged"},
              "targets": {"scale": TARGET_SCALE, "stage_s": STAGE_TARGET_S, "peak_rss_mib": RSS_TARGET_MIB},
              "results": results}
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    print(json.dumps({"bench": "data_scale", "results": [
        {k: r[k] for k in ("scale", "rows", "wall_s", "sum_of_stages_s", "peak_rss_mib", "stages_s")} | {"over": _over(r)}
        for r in results]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
