"""`mergeflow cache status` and `mergeflow cache gc`: what the download, per-merge and feature caches hold, and
cleaning them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from merging.io.diskspace import human  # sizes in KiB, MiB, ... (parse_size reads both kinds)


def _age(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    days = (time.time() - stamp) / 86400
    return f"{days:.1f} days ago" if days >= 1 else f"{days * 24:.1f} h ago"


def cmd_cache(args: argparse.Namespace) -> int:
    from merging.errors import ConfigError
    from merging.io.writer import parse_size
    from tasks.cache import gc, status

    root = Path(args.cache_dir) if args.cache_dir else None
    try:
        if args.cache_command == "status":
            data: dict[str, Any] = status(root)
            if args.json:
                print(json.dumps(data, indent=1))
                return 0
            print(f"cache {data['root']}: {human(data['bytes'])}")
            for area, a in data["areas"].items():
                print(
                    f"  {area:8s} {human(a['bytes']):>9s}  {a['entries']:4d} entries, {a['in_use']} in use; "
                    f"oldest use {_age(a['oldest_use'])}, newest {_age(a['newest_use'])}"
                )
            for name, size in data["not_collected"].items():
                print(f"  {name:7s} {human(size):>9s}  (not collected: remove zoo builds by hand)")
            return 0
        if args.keep_days is None and args.max_size is None:
            raise ConfigError("cache gc: give --keep-days N, --max-size SIZE, or both")
        max_size = parse_size(args.max_size, "--max-size") if args.max_size is not None else None
        report = gc(root, args.keep_days, max_size, args.grace_hours * 3600, args.dry_run)
    except ConfigError as exc:
        print(f"mergeflow: cache: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for r in report.removed:
        print(f"  {verb} {r['area']}/{r['key'][:16]} ({human(r['bytes'])}, {r['why']})")
    for key in report.skipped_in_use:
        print(f"  kept {key[:24]} (in use by a running flow)")
    print(
        f"cache gc: {verb} {len(report.removed)} entries and {report.blobs_removed} unlinked blobs, "
        f"{human(report.freed_bytes)} freed; {human(report.bytes_before)} → {human(report.bytes_after)}"
    )
    return 0


def add_cache_parser(sub: Any) -> None:
    c = sub.add_parser("cache", help="the download and layer caches: status, garbage collection")
    c.add_argument("cache_command", choices=["status", "gc"])
    c.add_argument("--cache-dir", default=None, help="cache folder (default: $MERGEFLOW_CACHE_DIR)")
    c.add_argument("--keep-days", type=float, default=None, help="gc: remove entries unused for N days")
    c.add_argument("--max-size", default=None, help="gc: then remove least recently used entries above SIZE (20GB)")
    c.add_argument(
        "--grace-hours", type=float, default=1.0, help="gc: --max-size never removes entries used this recently"
    )
    c.add_argument("--dry-run", action="store_true", help="gc: say what would go, remove nothing")
    c.add_argument("--json", action="store_true", help="print the status or the gc report as JSON")
    c.set_defaults(func=cmd_cache)
