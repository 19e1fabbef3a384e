"""A Ray head for one machine, with Prometheus (and Grafana where it is installed) to chart rlfleet's metrics.

    .venv/bin/python scripts/local_head.py start    # prints the addresses, the open ports, what to export
    .venv/bin/python scripts/local_head.py status   # the listening ports of the head's processes (--json)
    .venv/bin/python scripts/local_head.py stop

Everything listens on 127.0.0.1. Ray replaces ``--node-ip-address=127.0.0.1`` with the machine's reachable address,
so a plain ``ray start --head`` opens the GCS, the raylet, the agents and the metrics export port (which answers
without a token) on every interface; only the dashboard honours ``--dashboard-host``. This head runs in Ray's
single-machine mode instead (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does on macOS and Windows), in which
every Ray process binds loopback. The price: no other machine can join this head (for several machines, see
deploy/cluster-gpu.yaml and deploy/kuberay-rayjob.yaml). Token authentication stays on unless RAY_AUTH_MODE says
otherwise (the tests disable it; deploy/ never does).

Ray's client server (``ray://127.0.0.1:10001``, ``--client-port``) is part of the head too; ``status`` lists it with
the other listening ports.

``stop`` stops every process ``start`` started: ``start`` marks the environment of everything it launches (the GCS,
raylet, dashboard, client server, monitors, every worker and job driver they spawn, Prometheus, Grafana) with
``RLFLEET_LOCAL_HEAD=<dir>``; ``stop`` finds the marked processes (and any whose command line names the head's
directory), sends SIGTERM, and SIGKILL to what is left after ``--grace`` seconds (the GCS can hang in its SIGTERM
handler). It exits non-zero, naming them, if any survive. A ``start`` that fails part-way stops what it started.

Prometheus (Debian: ``apt-get install prometheus``) scrapes every node listed in Ray's service-discovery file, so
the series outlive the job (Ray's endpoints drop them seconds after the job ends). Grafana, if ``grafana-server``
or ``grafana`` is on PATH, starts with the configuration Ray generates for it (embedding allowed, anonymous
viewers), its dashboards plus deploy/grafana-dashboard.json, and the dashboard is told where both are
(RAY_GRAFANA_HOST, RAY_PROMETHEUS_HOST, RAY_GRAFANA_IFRAME_HOST), so its Metrics page embeds the charts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MARKER = "RLFLEET_LOCAL_HEAD"  # in the environment of every process of a head: its resolved directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("start", "status", "stop"))
    p.add_argument("--dir", type=Path, default=Path("/tmp/rlfleet-head"),
                   help="Ray's temp dir and the home of Prometheus's data and logs (default: %(default)s)")
    p.add_argument("--port", type=int, default=6379, help="the GCS port (RAY_ADDRESS=127.0.0.1:PORT)")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint on this node")
    p.add_argument("--client-port", type=int, default=10001,
                   help="Ray's client server (ray://127.0.0.1:PORT), which `ray start --head` always runs")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--grafana-port", type=int, default=3000)
    p.add_argument("--scrape-interval", default="5s")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--grace", type=float, default=10.0,
                   help="stop: seconds between SIGTERM and SIGKILL (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.epilog = "More `ray start` options go after --, e.g. -- --dashboard-agent-listen-port=52366"
    argv = sys.argv[1:] if argv is None else argv
    ray_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.ray_args = ray_args
    return args


def find_binary(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def wait_http(url: str, timeout_s: float, what: str) -> None:
    """Poll ``url`` until the server answers (a 401 from a dashboard that wants its token counts), or fail naming
    ``what`` (a bounded start-up wait, not a sleep around a race)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"local_head: {what} did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


def state_file(args) -> Path:
    return args.dir / "local-head.json"


def start(args) -> dict:
    """Start the head; if any part fails (or the start is interrupted), stop what was started and re-raise."""
    try:
        return start_parts(args)
    except BaseException:
        survivors = stop(args)
        if survivors:
            print(f"local_head: could not stop {describe(survivors)}", file=sys.stderr)
        raise


def start_parts(args) -> dict:
    args.dir.mkdir(parents=True, exist_ok=True)
    prometheus, grafana = find_binary("prometheus"), find_binary("grafana-server", "grafana")
    prom_url = f"http://{LOOPBACK}:{args.prometheus_port}"
    grafana_url = f"http://{LOOPBACK}:{args.grafana_port}"
    bin_dir = Path(sys.executable).parent  # this environment's python and ray first: a job's `python` is this one
    marked = {**os.environ, MARKER: str(args.dir.resolve())}  # inherited by every process the head starts
    env = {**marked, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if prometheus:
        env["RAY_PROMETHEUS_HOST"] = prom_url
    if grafana:
        env.update(RAY_GRAFANA_HOST=grafana_url, RAY_GRAFANA_IFRAME_HOST=grafana_url)
    ray = str(bin_dir / "ray")
    command = [ray, "start", "--head", f"--port={args.port}", f"--dashboard-host={LOOPBACK}",
               f"--dashboard-port={args.dashboard_port}", f"--metrics-export-port={args.metrics_port}",
               f"--ray-client-server-port={args.client_port}",
               f"--temp-dir={args.dir}", "--disable-usage-stats",
               *([f"--num-cpus={args.num_cpus}"] if args.num_cpus else []), *args.ray_args]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        raise SystemExit(f"local_head: `ray start` failed:\n{started.stderr[-3000:]}")
    wait_http(f"http://{LOOPBACK}:{args.dashboard_port}/api/version", 60, "the Ray dashboard")
    state = {"dir": str(args.dir), "address": f"{LOOPBACK}:{args.port}",
             "dashboard": f"http://{LOOPBACK}:{args.dashboard_port}", "metrics_port": args.metrics_port,
             "client": f"ray://{LOOPBACK}:{args.client_port}", "pids": {}}
    session = args.dir / "session_latest"
    if prometheus:
        config = args.dir / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {args.scrape_interval}, evaluation_interval: {args.scrape_interval}}}\n"
            "scrape_configs:\n"
            "  - job_name: ray\n"  # every node's metrics endpoint, as Ray lists them (written by the dashboard)
            f"    file_sd_configs: [{{files: ['{session / 'prom_metrics_service_discovery.json'}']}}]\n")
        state["pids"]["prometheus"] = spawn(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={args.dir / 'prometheus-data'}",
             f"--web.listen-address={LOOPBACK}:{args.prometheus_port}"], args.dir / "prometheus.log", marked)
        wait_http(f"{prom_url}/-/ready", 60, "Prometheus")
        state["prometheus"] = prom_url
    if grafana:  # Ray has written grafana.ini (embedding, anonymous viewer), the data source and its dashboards
        grafana_dir = session / "metrics" / "grafana"
        shutil.copy(ROOT / "deploy" / "grafana-dashboard.json", grafana_dir / "dashboards" / "rlfleet.json")
        home = next((p for p in ("/usr/share/grafana", "/usr/local/share/grafana") if Path(p).is_dir()), None)
        state["pids"]["grafana"] = spawn(
            [grafana, *(["server"] if grafana.endswith("/grafana") else []), f"--config={grafana_dir / 'grafana.ini'}",
             *([f"--homepath={home}"] if home else [])], args.dir / "grafana.log",
            {**marked, "GF_SERVER_HTTP_ADDR": LOOPBACK, "GF_SERVER_HTTP_PORT": str(args.grafana_port),
             "GF_PATHS_DATA": str(args.dir / "grafana-data")})
        wait_http(f"{grafana_url}/api/health", 60, "Grafana")
        state["grafana"] = grafana_url
    state_file(args).write_text(json.dumps(state, indent=2))
    return state


def spawn(command: list[str], log: Path, env: dict | None = None) -> int:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True).pid


def head_processes(directory: Path) -> list[psutil.Process]:
    """Every live process of the head in ``directory``: those whose environment carries its marker (all that
    ``start`` launched, and what they spawned: agents, workers, a job's driver, the client server, Prometheus,
    Grafana), those whose command line names the directory (a head started before the marker existed), and all
    their descendants. Never this process or its ancestors (``stop --dir=...`` names the directory too)."""
    resolved = str(directory.resolve())
    inside = f"{resolved}/"
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in safe(me.parents))}
    roots = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        if p.pid in ours:
            continue
        environ, cmdline = p.info["environ"] or {}, p.info["cmdline"] or []
        if environ.get(MARKER) == resolved or any(inside in part or part.endswith(f"={resolved}")
                                                  for part in cmdline):
            roots.append(p)
    seen = {}
    for p in roots:
        for q in [p, *safe(p.children, recursive=True)]:
            if q.pid not in ours and running(q):
                seen[q.pid] = q
    return list(seen.values())


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an exited process whose parent, often init in a container, has not reaped it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(procs: list[psutil.Process]) -> str:
    return ", ".join(f"{safe(p.name) or '?'} (pid {p.pid})" for p in procs)


def safe(method, **kwargs):
    try:
        return method(**kwargs)
    except psutil.Error:
        return []


def listening(directory: Path) -> list[dict]:
    """Every listening TCP socket of the head's processes: process name, address, port."""
    out = []
    for p in head_processes(directory):
        for conn in safe(p.net_connections, kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                out.append({"process": safe(p.name) or "?", "pid": p.pid, "ip": conn.laddr.ip,
                            "port": conn.laddr.port})
    return sorted(out, key=lambda s: s["port"])


def is_loopback(ip: str) -> bool:
    return ip.removeprefix("::ffff:") in ("127.0.0.1", "::1") or ip.startswith("127.")


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return those still running at the
    deadline."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if running(p)]
    return alive


def stop(args) -> list[psutil.Process]:
    """SIGTERM to every process of the head, SIGKILL to those left after ``args.grace`` seconds; then again for
    any process the head spawned meanwhile. Returns the processes still running (none, normally)."""
    grace = getattr(args, "grace", 10.0)
    procs = head_processes(args.dir)
    signal_all(procs, signal.SIGTERM)
    alive = wait_gone(procs, grace)
    for _ in range(3):  # a worker or agent started while the head went down has the marker too
        alive = [*alive, *(p for p in head_processes(args.dir) if p.pid not in {q.pid for q in alive})]
        if not alive:
            break
        signal_all(alive, signal.SIGKILL)
        alive = wait_gone(alive, 10)
    state_file(args).unlink(missing_ok=True)
    return alive


def report(state: dict, sockets: list[dict]) -> str:
    lines = [f"Ray head: RAY_ADDRESS={state['address']}  dashboard and job server: {state['dashboard']}"]
    if "client" in state:
        lines.append(f"  Ray client: {state['client']} (ray.init / rlfleet scale --address)")
    lines.append(f"  Prometheus: {state['prometheus']} (rlfleet's series: ray_rlfleet_*)" if "prometheus" in state
                 else "  Prometheus: not installed (apt-get install prometheus); no charts beyond the live endpoint")
    lines.append(f"  Grafana: {state['grafana']} (dashboard 'rlfleet'); the Ray dashboard's Metrics page embeds it"
                 if "grafana" in state else "  Grafana: not installed; the Ray dashboard's Metrics page stays empty")
    lines.append("Listening:")
    lines += [f"  {s['ip']}:{s['port']}  {s['process']}" + ("" if is_loopback(s["ip"]) else "   <- not loopback")
              for s in sockets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "stop":
        survivors = stop(args)
        if survivors:
            raise SystemExit(f"local_head: still running after SIGKILL: {describe(survivors)}")
        return
    if args.command == "start":
        if head_processes(args.dir):
            raise SystemExit(f"local_head: a head is already running in {args.dir}; stop it first")
        state = start(args)
    else:
        if not state_file(args).exists():
            raise SystemExit(f"local_head: no head running in {args.dir}")
        state = json.loads(state_file(args).read_text())
    sockets = listening(args.dir)
    print(json.dumps({**state, "listening": sockets}) if args.json else report(state, sockets))


if __name__ == "__main__":
    main()
