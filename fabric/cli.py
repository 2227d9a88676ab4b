"""The `fabric` command: validate, plan and run scenarios, and NetBackup-style admin commands.

Every error a user can cause is one clear line on stderr and a non-zero exit; a traceback
here is a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fabric import admin
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

    run = sub.add_parser("run", help="run a scenario on live daemons (real MQTT, real TLS, real SQLite)")
    run.add_argument("file", metavar="FILE")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--state", metavar="DIR", help="where catalog, storage, certificates and logs go (default: ./state/<scenario>)")
    run.add_argument("--broker", metavar="URL", help="use this MQTT broker (mqtt://host:port) instead of the embedded one")
    run.add_argument("--capture", action="store_true", help="route every data leg through a relay that records the wire")
    run.add_argument("--processes", action="store_true",
                     help="run each daemon as its own OS process (`fabric daemon`); a crash fault is a real SIGKILL")
    run.add_argument("-v", "--verbose", action="store_true", help="daemon logs on the console too")
    run.add_argument("--serve", action="store_true",
                     help="after the steps, keep the fabric up with each primary's REST API until Ctrl-C")
    run.set_defaults(handler=cmd_run)

    up = sub.add_parser("up", help="bring a topology up (no steps) with each primary's REST API, until Ctrl-C")
    up.add_argument("file", metavar="FILE")
    up.add_argument("--state", metavar="DIR", help="the state folder (default: ./state/<scenario>)")
    up.add_argument("--broker", metavar="URL", help="use this MQTT broker instead of the embedded one")
    up.set_defaults(handler=cmd_up)

    daemon = sub.add_parser("daemon", help="run one host of a topology as its own process, until SIGTERM")
    daemon.add_argument("file", metavar="FILE", help="the topology the host belongs to")
    daemon.add_argument("host", metavar="HOST")
    daemon.add_argument("--broker", metavar="URL", required=True, help="the MQTT broker (mqtt://host:port)")
    daemon.add_argument("--state", metavar="DIR", required=True, help="the state folder the topology shares")
    daemon.add_argument("--resume", action="store_true",
                        help="a restart after a crash: a primary keeps its catalog's settings, not the topology's")
    daemon.set_defaults(handler=cmd_daemon)

    admin.register(sub)
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


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from fabric import logs
    from fabric.broker import parse_broker_url
    from fabric.bus import BusError
    from fabric.scenario.run import run_scenario

    scenarios = load_all([args.file])
    if scenarios is None:
        return EXIT_INVALID
    scenario = scenarios[0]
    if args.broker:
        try:
            parse_broker_url(args.broker)
        except ValueError as exc:
            print(f"error: --broker: {exc}", file=sys.stderr)
            return EXIT_INVALID
    state = as_path(args.state) if args.state else Path("state") / scenario.name
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --state {state}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    log_file = state / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    logs.configure(log_file, args.verbose)
    progress = Progress(enabled=not args.json, total=len(scenario.steps))
    on_step, keep = progress.update, None
    if args.serve:
        if args.processes:
            print("error: --serve needs the in-process fabric (no --processes)", file=sys.stderr)
            return EXIT_INVALID
        on_step, keep = serving(args, scenario, state, progress)
    try:
        report = asyncio.run(run_scenario(scenario, state, broker_url=args.broker, capture=args.capture, on_step=on_step,
                                          on_progress=progress.moved, keep=keep, processes=args.processes))
    except BusError as exc:
        print(f"error: cannot reach the MQTT broker: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: cannot run {scenario.path}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        progress.finish()
        if not args.serve:  # --serve printed the table before serving
            print(render_run(report))
        print(f"\nstate: {report.state_dir}   logs: {log_file}")
        for domain, catalog in report.catalogs.items():
            print(f"catalog ({domain}): {catalog}")
    return EXIT_OK if report.ok else EXIT_UNMET


def serving(args: argparse.Namespace, scenario, state: Path, progress: "Progress"):
    """`fabric run --serve`: (on_step, keep) for run_scenario; keep prints the steps' table,
    then serves each primary's API until Ctrl-C."""
    from fabric.scenario.run import RunReport

    reports = []

    def on_step(step, report) -> None:
        progress.update(step, report)
        if report is not None:
            reports.append(report)

    async def keep(fabric) -> None:
        out = sys.stderr if args.json else sys.stdout
        if not args.json:
            print(render_run(RunReport(scenario.name, str(state), list(reports))), file=out)
        await admin.serve_fabric(list(fabric.daemons.values()), state, out)

    return on_step, keep


def cmd_up(args: argparse.Namespace) -> int:
    """`fabric run --serve` for a topology without its steps: the fabric is there to be
    driven by the admin commands, the REST API, or `fabric daemon` hosts joining it."""
    import asyncio
    import dataclasses

    from fabric import logs
    from fabric.bus import BusError
    from fabric.scenario.run import run_scenario

    scenarios = load_all([args.file])
    if scenarios is None:
        return EXIT_INVALID
    scenario = dataclasses.replace(scenarios[0], steps=())
    state = as_path(args.state) if args.state else Path("state") / scenario.name
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --state {state}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    logs.configure(state / "logs" / f"up-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")

    async def keep(fabric) -> None:
        print(f"{scenario.name}: {len(fabric.daemons)} hosts up; broker {fabric.broker_url}", flush=True)
        await admin.serve_fabric(list(fabric.daemons.values()), state, sys.stdout)

    try:
        asyncio.run(run_scenario(scenario, state, broker_url=args.broker, keep=keep))
    except BusError as exc:
        print(f"error: cannot reach the MQTT broker: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: cannot bring up {args.file}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from fabric import logs
    from fabric.broker import parse_broker_url
    from fabric.scenario.run import build_daemon, domain_cas

    scenarios = load_all([args.file])
    if scenarios is None:
        return EXIT_INVALID
    scenario = scenarios[0]
    if args.host not in scenario.hosts:
        print(f"error: {args.file}: no host {args.host!r}; hosts: {', '.join(scenario.hosts)}", file=sys.stderr)
        return EXIT_INVALID
    try:
        parse_broker_url(args.broker)
    except ValueError as exc:
        print(f"error: --broker: {exc}", file=sys.stderr)
        return EXIT_INVALID
    state = as_path(args.state)
    logs.configure(state / "logs" / f"{args.host}.jsonl")

    async def serve() -> None:
        daemon = build_daemon(scenario, args.host, state, args.broker, domain_cas(scenario, state), resume=args.resume)
        await daemon.start()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
        await stopping.wait()
        await daemon.stop()

    try:
        asyncio.run(serve())
    except Exception as exc:  # one line for the runner that started us, the details in the log
        print(f"error: {args.host}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return EXIT_OK


class Progress:
    """One line per step on stderr: what runs now, then how it ended."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total
        self.tty = sys.stderr.isatty()
        self.current = None
        self.started = 0.0

    def update(self, step, report) -> None:
        if not self.enabled:
            return
        if report is None:
            self.current, self.started = step, time.monotonic()
            self._running("")
            return
        mark = {"met": "ok", "unmet": "UNMET", None: "--"}[report.expect]
        line = f"[{step.index}/{self.total}] {step.op:<14} status {report.status if report.status is not None else '-':<5} {mark}"
        print(("\r\x1b[K" if self.tty else "") + line, file=sys.stderr, flush=True)

    def moved(self, job_id: int, moved: int) -> None:
        """A progress event from a data leg: bytes moved so far by the running job."""
        if self.enabled and self.current is not None:
            seconds = time.monotonic() - self.started
            self._running(f" job {job_id}: {moved / 1e6:.0f} MB, {moved / 1e6 / max(seconds, 1e-3):.0f} MB/s")

    def _running(self, detail: str) -> None:
        if self.tty:
            step = self.current
            print(f"\r\x1b[K[{step.index}/{self.total}] {step.op} ...{detail}", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.current = None


def render_run(report) -> str:
    rows = [("step", "op", "job", "status", "dte", "tls", "MB", "s", "verified", "expect", "detail")]
    for s in report.steps:
        tls = f"{s.tls['version']}" if s.tls else "-"
        detail = "; ".join(s.unmet) if s.unmet else s.reason
        if s.backup_id:
            detail = f"{s.backup_id}" + (f" copy {s.copy}" if s.copy else "") + f": {detail}"
        rows.append((str(s.step), s.op, str(s.job_id or "-"), "-" if s.status is None else str(s.status), s.dte_mode or "-",
                     tls, f"{s.bytes / 1e6:.1f}" if s.bytes else "-", f"{s.seconds:.2f}" if s.seconds else "-",
                     {None: "-", True: "yes", False: "NO"}[s.verified], s.expect or "-", detail))
        for child in s.children:
            rows.append(("", f"  {child['op']}", str(child["job_id"] or "-"), str(child["status"]), child["dte_mode"] or "-",
                         child["tls"]["version"] if child["tls"] else "-", f"{child['bytes'] / 1e6:.1f}" if child["bytes"] else "-",
                         f"{child['seconds']:.2f}", {None: "-", True: "yes", False: "NO"}[child["verified"]], "", child["reason"]))
        if s.copies:
            copies = ", ".join(f"copy {c['copy']} on {c['media_server']} (copy DTE {c['copy_dte_mode']}, hierarchical {c['hierarchical_dte_mode']})"
                               for c in s.copies)
            rows.append(("", "", "", "", "", "", "", "", "", "", f"image DTE {s.image_dte_mode or '?'}; {copies}" if s.image_dte_mode else copies))
    verdict = "all expectations met" if report.ok else "SOME EXPECTATIONS UNMET"
    return f"run: {report.scenario} ({verdict}, {report.seconds:.1f} s)\n" + table(rows)


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
