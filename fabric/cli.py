"""The `fabric` command: validate, plan and run scenarios, and NetBackup-style admin commands.

Every error a user can cause is one clear line on stderr and a non-zero exit; a traceback
here is a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fabric.scenario.loader import ScenarioError, load_scenario
from fabric.scenario.plan import Plan, plan_scenario

EXIT_OK = 0
EXIT_UNMET = 1
EXIT_INVALID = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_INVALID
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fabric", description="A simulated NetBackup-style backup fabric for data-in-transit encryption.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = sub.add_parser("validate", help="check scenario files without running anything")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(handler=cmd_validate)

    plan = sub.add_parser("plan", help="what-if: each step's DTE decision, no data moves")
    plan.add_argument("files", nargs="+", metavar="FILE")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=cmd_plan)

    return parser


def load_all(files: list[str]) -> list | None:
    scenarios, failed = [], False
    for name in files:
        try:
            scenarios.append(load_scenario(name))
        except ScenarioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    return None if failed else scenarios


def cmd_validate(args: argparse.Namespace) -> int:
    scenarios = load_all(args.files)
    if scenarios is None:
        return EXIT_INVALID
    for scenario in scenarios:
        print(f"{scenario.path}: ok ({scenario.name}: {len(scenario.hosts)} hosts, {len(scenario.steps)} steps)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    scenarios = load_all(args.files)
    if scenarios is None:
        return EXIT_INVALID
    plans = [plan_scenario(s) for s in scenarios]
    if args.json:
        payload = plans[0].as_json() if len(plans) == 1 else [p.as_json() for p in plans]
        print(json.dumps(payload, indent=2))
    else:
        for plan in plans:
            print(render_plan(plan))
    return EXIT_OK


def render_plan(plan: Plan) -> str:
    rows = [("step", "op", "on", "decision", "status", "why")]
    for s in plan.steps:
        decision = s.decision.value if s.decision else "-"
        rows.append((str(s.step), s.op, s.subject, decision, str(s.status) if s.decision else "", s.reason))
    return f"plan: {plan.scenario}\n" + table(rows)


def table(rows: list[tuple[str, ...]]) -> str:
    """A plain aligned text table; the last column is left unpadded (it is the long one)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
    return "\n".join(lines)


def as_path(value: str) -> Path:
    return Path(value).expanduser()


if __name__ == "__main__":
    sys.exit(main())
