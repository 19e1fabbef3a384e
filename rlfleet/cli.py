"""`rlfleet train | dpo | scale | config | tiny-model`: the command line.

``rlfleet train job.yaml learner.learning_rate=1e-5 generation.num_generations=8`` loads defaults < file <
overrides, validates everything before Ray starts, and runs the job (on the cluster at ``cluster.address`` or
``RAY_ADDRESS``, else on a local Ray cluster it starts itself). ``ray job submit -- rlfleet train job.yaml`` runs the
same program as the job's driver. ``rlfleet scale --address ADDR --job NAME --generators N`` changes the size of a
running job's generator fleet.

User modules (``algorithm.reward_funcs: [my_rewards:score]``) are looked up from the directory ``rlfleet`` is started
in, as ``python -m`` would, and on a local cluster every actor finds them there too (Ray starts its workers with the
driver's import path). On a cluster of several nodes the other nodes have no such directory: ship it with the job
(``ray job submit --working-dir .`` or ``runtime_env``'s ``working_dir`` / ``py_modules``).
"""

from __future__ import annotations

import argparse
import os
import sys

from rlfleet.config import ConfigError, dump_config, load_config
from rlfleet.errors import CheckpointError, ClusterError, OutputDirError, RunFailed

# Exit codes: 0 done (or stopped after a final checkpoint), 2 bad input (config, data, cluster too small, checkpoint,
# output_dir unusable or in use), 3 a run that had to stop (RunFailed), 130 stopped before anything was trained.
# Errors are one message; --debug raises them with their traceback instead.
EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_STOPPED = 2, 3, 130


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML job config (defaults are used for anything it omits)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.learning_rate=1e-5")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (bad input, a run that had to stop), not only its message")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlfleet", description="Ray-distributed RL post-training: GRPO, GSPO(-token), GFPO, replay, DPO+BEMA."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy with GRPO / GSPO / GSPO-token / GFPO (+ replay)")
    _add_job_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    p = sub.add_parser("dpo", help="train with DPO and BEMA reference-model updates")
    _add_job_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    p = sub.add_parser("scale", help="set the number of generation actors of a running job")
    p.add_argument("--address", default=None,
                   help="the Ray cluster (as for `ray job submit`); default RAY_ADDRESS, else the local cluster")
    p.add_argument("--job", required=True, help="the job's name: cluster.job_name, else the last part of output_dir")
    p.add_argument("--generators", type=int, required=True, help="generation actors to keep (>= 1)")

    p = sub.add_parser(
        "config", help="check a job without starting Ray and print its resolved config, or every problem",
        description="Check a job as far as can be done without Ray, and print its resolved config (or every problem, "
        "exit 2): the config's fields; the model directory and its weights; the dataset, its columns (after "
        "data.column_mapping) and its split; the evaluation split; the reward, group filter and environment modules "
        "(imported); prompt lengths. Left to `rlfleet train` / `rlfleet dpo`: a model or dataset named on the hub "
        "(not downloaded here; the names are listed), the cluster's resources, and the engines and actors starting.")
    _add_job_args(p)
    p.add_argument("--for", dest="job", choices=("train", "dpo"), default=None,
                   help="check the job as `rlfleet train` or `rlfleet dpo` runs it; default: dpo for a built-in "
                   "preference dataset or a job that names no reward function (and no built-in task), else train")

    p = sub.add_parser("tiny-model", help="build the offline random-init tiny model + tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--size", default="tiny", help="built-in size: tiny (330k params) or small (~20M)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _load(args: argparse.Namespace):
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:  # `rlfleet config a.b=1`: no file, only overrides
        path, overrides = None, [path, *overrides]
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")
    return load_config(path, overrides)


def importable_cwd() -> None:
    """Put the current directory first on the import path, as ``python -m`` and ``python script.py`` do; a console
    script (``.venv/bin/rlfleet``) starts with its own directory there instead."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    importable_cwd()
    try:
        if args.command == "tiny-model":
            from rlfleet.models import build_tiny_model

            try:
                out = build_tiny_model(args.out_dir, size=args.size, seed=args.seed)
            except ValueError as err:  # an unknown --size
                print(f"rlfleet tiny-model: --size: {err}", file=sys.stderr)
                return EXIT_BAD_INPUT
            print(f"wrote {args.size} model and tokenizer to {out}")
            return 0
        if args.command == "scale":
            return _scale(args)
        cfg = _load(args)
        if args.command == "config":
            _check(cfg, args.job)
            print(dump_config(cfg))
            return 0
        if args.command in ("train", "dpo"):
            if args.command == "train":
                from rlfleet.cluster.driver import train as run
            else:
                from rlfleet.cluster.dpo_job import train_dpo as run
            summary = run(cfg)
            return EXIT_STOPPED if summary.get("stopped") and summary.get("step") is None else 0
    except (ConfigError, ClusterError, CheckpointError, OutputDirError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"rlfleet {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        if getattr(args, "debug", False):
            raise
        print(f"rlfleet {args.command}: the run stopped: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handler (config, data, model checks)
        print(f"\nrlfleet {args.command}: interrupted while checking the job; nothing was started", file=sys.stderr)
        return EXIT_STOPPED
    return 1


def _check(cfg, job: str | None) -> None:
    """``rlfleet config``'s checks: the preflight of the command the job is for, nothing fetched from the hub (what
    that leaves unchecked is said on stderr); raises ConfigError listing every problem."""
    from rlfleet.cluster.preflight import hub_names, preflight, preflight_dpo
    from rlfleet.data import BUILTIN_PREFIX, BUILTIN_TASKS
    from rlfleet.dpo.data import BUILTIN_PREFERENCES

    name = cfg.data.dataset
    builtin = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else None
    if job is None and builtin in BUILTIN_PREFERENCES:
        job = "dpo"
    elif job is None and not (cfg.algorithm.reward_funcs or builtin in BUILTIN_TASKS):
        job = "dpo"  # `rlfleet train` would have no reward function
        print("rlfleet config: checking the job as for `rlfleet dpo` (it names no reward function; --for train checks "
              "it as for `rlfleet train`)", file=sys.stderr)
    job = job or "train"
    (preflight_dpo if job == "dpo" else preflight)(cfg, fetch=False)
    if unchecked := hub_names(cfg):
        print(f"rlfleet config: checked as for `rlfleet {job}`; not downloaded, left to it: {', '.join(unchecked)}",
              file=sys.stderr)


def _scale(args: argparse.Namespace) -> int:
    import os

    from rlfleet.cluster.control import scale

    if args.generators < 1:
        print("rlfleet scale: --generators must be at least 1", file=sys.stderr)
        return 2
    try:
        status = scale(args.address or os.environ.get("RAY_ADDRESS"), args.job, args.generators)
    except (ValueError, ConnectionError) as err:
        print(f"rlfleet scale: {err}", file=sys.stderr)
        return 2
    running = status.get("generators", "?")
    print(f"rlfleet scale: job {args.job!r} asked for {args.generators} generator(s); {running} running at its last "
          f"step ({status.get('step', 0)}); watch fleet/generators in metrics.jsonl or the dashboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
