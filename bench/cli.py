"""The `prefbench` command: run, list, report, compare, perf, export-env.

User mistakes (bad suite, unknown plugin, missing file, existing --out, an env that came out empty)
are one line on stderr and exit code 2, with nothing left in OUT. A run whose trials partly failed
still writes every result and exits 1; trials.parquet names each failure. A failed shared stage
(env SFT, reward model) is one line and exit 1. Ctrl-C / SIGTERM stops a run cleanly (Ray shut
down, no results written, finished trials and checkpoints kept): one line saying how to continue
with --resume, exit 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too; keep it short)
        print(f"prefbench: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prefbench", description="Benchmark preference-optimization algorithms for LMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a suite (default: the packaged quick suite)")
    r.add_argument("suite", nargs="?", help="suite YAML file (default: bench/suites/quick.yaml)")
    r.add_argument("--out", help="output directory (default: runs/<suite>-<time>); must not exist or be empty")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite key, e.g. --set train.steps=50 --set algorithms.3.sweep.beta=[0.5]")
    r.add_argument("--address", help="Ray cluster address to join (default: start Ray embedded)")
    r.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out (same suite and --set): finished trials are kept, "
                        "the others restart from their last checkpoint")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the suite and print its trial plan and resources; start nothing, write nothing")
    r.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (stage and trial steps, trial starts, evaluations, ends); "
                        "failures, errors and the closing line stay")
    sub.add_parser("list", help="list the registered algorithms and envs")
    rep = sub.add_parser("report", help="rebuild OUT's report (tables, plots, HTML) from OUT/*.parquet")
    rep.add_argument("out", help="a run's output directory")
    rep.add_argument("--kl-budgets", metavar="B,B,...", help="KL budgets in nats (default: the run's report.kl_budgets)")
    rep.add_argument("--temperature-kl-budget", type=float, metavar="B",
                     help="KL budget in nats of each algorithm's point in the temperature plot (default: the run's)")
    rep.add_argument("--baseline", metavar="ALGORITHM",
                     help="algorithm the paired per-seed differences are taken against (default: the run's report.baseline)")
    cmp = sub.add_parser("compare", help="put several runs side by side (per algorithm: each run's numbers and the difference)")
    cmp.add_argument("outs", nargs="+", metavar="OUT", help="run output directories (the difference is last - first)")
    cmp.add_argument("--out", dest="dest", help="also write compare.md, compare.csv and compare_frontier.png/.svg here")
    cmp.add_argument("--baseline", metavar="ALGORITHM",
                     help="algorithm of each run's paired differences (default: each run's report.baseline)")
    exp = sub.add_parser(
        "export-env", help="write an env's SFT policy, pairs and prompts for other tools (Hugging Face, TRL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prepare ENV as `prefbench run` does (cached; the SFT runs as a Ray Train job only when the env\n"
                    "is not cached yet) and write it to DIR for Hugging Face tools and TRL:\n"
                    "  sft/                  SFT policy + tokenizer (save_pretrained; AutoModelForCausalLM loads it)\n"
                    "  pairs.parquet         prompt, chosen, rejected (+ chosen_gold, rejected_gold): TRL DPO/reward\n"
                    "  prompts.parquet       prompt: the train prompts (TRL's online trainers)\n"
                    "  eval_prompts.parquet  prompt: the evaluation prompts\n"
                    "  references.parquet    prompt, completion, gold: one SFT sample per eval prompt\n"
                    "  README.md             env, params, seed, gold reward, tokenization, a TRL example",
        epilog="example: prefbench export-env tiny-sentiment out/tiny --set env.params.num_reviews=2000 --seed 1")
    exp.add_argument("env", metavar="ENV", help="env name (see `prefbench list`)")
    exp.add_argument("dir", metavar="DIR", help="output directory; must not exist or be empty")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="an env param as in a suite, e.g. --set env.params.num_reviews=2000 (also deepspeed.*, "
                          "scaling.*, cache_dir, storage_path)")
    exp.add_argument("--seed", type=int, default=0, help="the env's seed, as in a suite's seeds (default: 0)")
    exp.add_argument("--address", help="Ray cluster address for the SFT stage (default: start Ray embedded)")
    perf = sub.add_parser(
        "perf", help="tokens/s and fraction of the machine's peak of DPO, RM, PPO, generation, evaluation (optionally vs TRL)")
    perf.add_argument("--env", default="tiny-sentiment", help="env to measure on (prepared and cached like a run's)")
    perf.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="env params and shapes as in a suite: env.params.*, train.batch_size, train.lr, eval.*")
    perf.add_argument("--seed", type=int, default=0, help="the env's seed (default: 0)")
    perf.add_argument("--steps", type=int, default=20, help="timed optimizer steps per training measurement (median)")
    perf.add_argument("--ppo-steps", type=int, default=3, help="timed PPO iterations (median)")
    perf.add_argument("--repeats", type=int, default=3, help="repeats of the peak, generation and evaluation timings")
    perf.add_argument("--rounds", type=int, default=1,
                      help="run every part this many times, interleaved, and report medians (a noisy machine)")
    perf.add_argument("--vs", choices=["trl"], help="also train TRL's DPOTrainer and RewardTrainer on the same work")
    perf.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    perf.add_argument("--address", help="Ray cluster address, only to prepare an env that is not cached yet")
    perf.add_argument("--suite", nargs="?", const="", metavar="SUITE.yaml",
                      help="instead: run a whole suite (default: quick) and report its wall time, start-up share and "
                           "peak memory of all its processes on this machine (--set applies to the suite; --vs, "
                           "--steps, --rounds and the like do not)")
    perf.add_argument("--cold", action="store_true",
                      help="with --suite: an empty private cache, so the env and reward model are built too")
    return p


def _list() -> None:
    """One row per registered plugin: kind, name, origin, frontier knob, needs; broken plugins on stderr."""
    from algorithms import ALGORITHMS
    from envs import ENVS

    rows = [("kind", "name", "knob", "needs", "origin")]
    for name in ALGORITHMS.names():
        a = ALGORITHMS.get(name)
        rows.append(("algorithm", name, a.knob or "-", ",".join(sorted(a.needs)) or "-", ALGORITHMS.origin(name)))
    for name in ENVS.names():
        rows.append(("env", name, "-", "-", ENVS.origin(name)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    for reg in (ALGORITHMS, ENVS):
        for name, err in reg.broken.items():
            print(f"prefbench: skipped {reg.kind} plugin {name}: {err}", file=sys.stderr)


def _report_settings(args):
    """The run's own report settings with the command line's overrides, or None to use the run's."""
    import dataclasses

    from bench.config import ConfigError, ReportSettings, build_dataclass
    from bench.report import saved_settings

    if args.kl_budgets is None and args.temperature_kl_budget is None and args.baseline is None:
        return None
    changes = dataclasses.asdict(saved_settings(Path(args.out)))
    if args.kl_budgets is not None:
        try:
            changes["kl_budgets"] = [float(b) for b in args.kl_budgets.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"--kl-budgets: expected numbers separated by commas, got {args.kl_budgets!r}") from None
    if args.temperature_kl_budget is not None:
        changes["temperature_kl_budget"] = args.temperature_kl_budget
    if args.baseline is not None:
        changes["baseline"] = args.baseline
    return build_dataclass(ReportSettings, changes, "report")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bench.config import ConfigError
    from bench.report import ReportError
    from bench.results import write_text_atomic
    from bench.errors import Interrupted, StageError, UserError

    try:
        if args.command == "list":
            _list()
        elif args.command == "report":
            from bench.report import write_report

            print(write_report(Path(args.out), _report_settings(args)))
        elif args.command == "compare":
            from bench.report import compare

            print(compare([Path(o) for o in args.outs], Path(args.dest) if args.dest else None, args.baseline), end="")
        elif args.command == "perf" and args.suite is not None:
            from bench.tools.perf import format_suite_perf, run_suite_perf

            if args.vs:
                raise UserError("--vs trl measures the parts of a trial; it does not combine with --suite")
            numbers = run_suite_perf(args.suite or None, args.overrides, cold=args.cold, address=args.address)
            print(format_suite_perf(numbers))
            if args.json_out:
                write_text_atomic(Path(args.json_out), json.dumps(numbers, indent=2))
        elif args.command == "perf":
            from bench.tools.perf import format_perf, run_perf

            numbers = run_perf(args.env, args.overrides, seed=args.seed, steps=args.steps, ppo_steps=args.ppo_steps,
                               repeats=args.repeats, rounds=args.rounds, vs_trl=args.vs == "trl", address=args.address)
            print(format_perf(numbers))
            if args.json_out:
                write_text_atomic(Path(args.json_out), json.dumps(numbers, indent=2))
        elif args.command == "export-env":
            from bench.export import export_env

            print(export_env(args.env, args.dir, args.overrides, seed=args.seed, address=args.address))
        elif args.command == "run" and args.dry_run:
            from bench.run.driver import plan

            print(plan(args.suite, args.overrides, args.address))
        elif args.command == "run":
            from bench.progress import set_quiet
            from bench.run.driver import run

            set_quiet(args.quiet)
            _, failed = run(args.suite, args.overrides, args.out, args.address, resume=args.resume)
            if failed:
                return 1  # results are written; trials.parquet says which trials failed and why
    except (ConfigError, UserError, ReportError) as e:
        print(f"prefbench: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:  # not the user's mistake as far as we can tell, but still one line
        print(f"prefbench: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"prefbench: {e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
