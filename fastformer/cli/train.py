"""`fastformer train`: train a language model or an encoder-decoder, resume a run, fine-tune."""

import os
import sys

from fastformer.cli.options import add_backend, apply_backend
from fastformer.errors import FastformerError, printable


def add_parser(sub):
    from fastformer.training.config import PRECISION_CHOICES, TASKS

    p = sub.add_parser("train", help="train a language model or an encoder-decoder")
    p.add_argument("--config", help="YAML run config (sections model or seq2seq, data, train), applied on top of "
                                    "the preset (default: none, the preset's settings)")
    p.add_argument("--preset", help="language models: tiny, small or medium (default tiny; --config is "
                                    "applied on top)")
    p.add_argument("--task", choices=TASKS, help="data.task: text (a language model, the default) or an "
                                                 "encoder-decoder on copy/reverse/sort strings or pairs (--data)")
    p.add_argument("--data", help="UTF-8 text file or directory from fastformer prepare (default: the embedded "
                                  "stdlib-documentation corpus); --task pairs: a source<TAB>target file")
    p.add_argument("--tokenizer", help="byte, char or a tokenizer directory (data.tokenizer; default byte, and a "
                                       "prepared directory brings its own)")
    p.add_argument("--out", help="run directory (default runs/<preset or config name>)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps, the schedule's length (train.max_steps; "
                                                 "default: the config's, 2000 for tiny)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--init-from", metavar="DIR", help="fine-tune: start from the weights, config and tokenizer of a "
                                                      "Hugging Face GPT-2 directory or a fastformer run/checkpoint, "
                                                      "with a fresh optimizer at step 0; --set changes dropout, lr, "
                                                      "steps, not widths (default: new weights)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI even if no MPI launcher is detected (mpiexec -n N is "
                        "detected by itself); needs pip install \"fastformer[mpi]\"")
    p.add_argument("--seed", type=int, help="train.seed (default: the config's, 0)")
    p.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="train.precision: the matrix products in float32 or with bfloat16 products (a CPU with "
                        "AVX-512 BF16); auto picks bf16 where it runs natively, else fp32 (default: the config's, "
                        "fp32)")
    add_backend(p)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; default: none)")
    p.set_defaults(func=main)


def resolve_train_config(args):
    """The RunConfig a `train` command asks for, validated before any work."""
    from fastformer.training.checkpoint import latest_checkpoint
    from fastformer.training.config import RunConfig, apply_overrides, load_config, preset

    if args.resume:
        if args.preset is not None or args.config is not None or args.seed is not None or args.task or args.init_from:
            raise FastformerError("--resume continues with the run's saved config: drop --preset/--config/--seed/"
                                  "--task/--init-from (change settings with --set or --max-steps)")
        config = load_config(os.path.join(latest_checkpoint(args.out), "config.yaml"))
    elif args.init_from:
        from fastformer.training.finetune import init_config

        for flag, given in (("--preset", args.preset), ("--tokenizer", args.tokenizer)):
            if given:
                raise FastformerError(f"--init-from takes the model and its tokenizer from {args.init_from!r}: drop "
                                      f"{flag} (training settings: --config, --set)")
        config = init_config(args.init_from)
        if args.config is not None:
            config = load_config(args.config, base=config)
    else:
        # the presets size language models; an encoder-decoder task starts from the defaults
        task = args.task or (load_config(args.config).data.task if args.config is not None else "text")
        if task == "text":
            config = preset("tiny" if args.preset is None else args.preset)  # '' is refused by name
        elif args.preset is not None:
            raise FastformerError(f"--preset sizes language models, not the {task} task: size an encoder-decoder "
                                  f"with --config (e.g. experiments/configs/tiny_reverse.yaml) or "
                                  f"--set seq2seq.KEY=VALUE")
        else:
            config = RunConfig()
        if args.config is not None:
            config = load_config(args.config, base=config)
    flags = [f"data.task={args.task}"] if args.task else []
    if args.data is not None:
        flags.append(f"data.path={args.data}")
    if args.tokenizer is not None:
        flags.append(f"data.tokenizer={args.tokenizer}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.max_steps is not None:
        flags.append(f"train.max_steps={args.max_steps}")
    if args.precision is not None:
        flags.append(f"train.precision={args.precision}")
    resolved = apply_overrides(config, flags + list(args.set))
    if args.resume and resolved.data.tokenizer != config.data.tokenizer:
        raise FastformerError(f"--resume continues with the run's own tokenizer (data.tokenizer="
                              f"{config.data.tokenizer!r}): drop --tokenizer / --set data.tokenizer")
    return resolved


def default_out_dir(args):
    if args.init_from and not args.config:
        return os.path.join("runs", os.path.basename(os.path.normpath(args.init_from)) + "-finetune")
    if args.config is not None:
        return os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    return os.path.join("runs", args.preset or args.task or "tiny")


def describe_schedule(t):
    """The learning rate of a run in a few words, min_lr resolved: "lr 0.005 -> 0.0005 cosine"."""
    if t.schedule == "constant":
        return f"lr {t.lr:g} constant"
    end = f"{t.final_lr():g}" + (" (lr / 10)" if t.min_lr is None else "")
    return f"lr {t.lr:g} -> {end} {t.schedule}"


def resume_command(args, comm):
    """The command line that continues the run of `args` (under mpiexec with as many ranks)."""
    import shlex

    cmd = ["fastformer", "train", "--resume", "--out", args.out]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.distributed:
        cmd.append("--distributed")
    if comm.size > 1:
        cmd = ["mpiexec", "-n", str(comm.size)] + cmd
    return shlex.join(cmd)


def main(args):
    import time

    from fastformer import get_backend
    from fastformer.training.checkpoint import checkpoint_dirs
    from fastformer.training.distributed import RanksDiffer, abort_on_error, check_same_on_every_rank, get_comm
    from fastformer.training.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, fit_columns

    # MPI under mpiexec (mpi4py imported only then), first: a rank refused from here on ends the
    # whole job instead of leaving the others waiting for it
    comm = get_comm(True if args.distributed else None)
    with abort_on_error(comm, passthrough=(RanksDiffer,)):
        if args.out is None:
            if args.resume:
                raise FastformerError("--resume needs --out RUN_DIR: the run to continue")
            args.out = default_out_dir(args)
        config = resolve_train_config(args)
        try:
            check_same_on_every_rank(comm, "arguments and config", {
                "args": {k: v for k, v in vars(args).items() if k != "func"}, "config": config.to_dict()})
        except RanksDiffer:  # raised on every rank at once: rank 0 says it, no rank has to abort the others
            if comm.rank == 0:
                raise
            return 2
        apply_backend(args)
    trainer = Trainer(config, args.out, resume=args.resume, comm=comm, init_from=args.init_from)
    ranks = f"; {comm.size} ranks" if comm.size > 1 else ""
    if trainer.is_main:
        source = [f"weights from {trainer.init_from}"] if trainer.init_from else []
        print(printable(fit_columns([f"training {trainer.model.num_parameters():,} parameters ({trainer.config.kind}) "
                                     f"on {trainer.task.describe()}", *source,
                                     f"backend {get_backend()}{ranks}, precision {trainer.config.train.precision}",
                                     describe_schedule(trainer.config.train),
                                     f"run directory {args.out}", f"step {trainer.step} of {config.train.max_steps}"],
                                    sep="; ")), flush=True)
    start = time.perf_counter()
    try:
        losses = trainer.train()
    except (NonFiniteLossError, FastformerError) as e:  # raised on every rank at once: rank 0 says it
        if trainer.is_main:
            raise
        return 1 if isinstance(e, NonFiniteLossError) else 2
    except TrainingInterrupted as e:  # the first Ctrl-C: every rank stopped after the same step, checkpointed
        if trainer.is_main:
            print(printable(f"\nfastformer train: stopped by {e.signal} at step {e.step} of "
                            f"{config.train.max_steps}; wrote {e.checkpoint}\n"
                            f"resume with: {resume_command(args, comm)}"),
                  file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the newest complete checkpoint stands
        if trainer.is_main:
            newest = checkpoint_dirs(args.out)
            print(printable(f"\nfastformer train: stopped at once at step {trainer.step}; the newest complete "
                            f"checkpoint is {newest[-1] if newest else 'none'}"
                            + (f"\nresume with: {resume_command(args, comm)}" if newest else "")), file=sys.stderr)
        return 130
    if not losses and trainer.is_main:  # a resumed run that had already finished
        print(printable(f"nothing to train: the run in {args.out} is at step {trainer.step} = train.max_steps; "
                        f"give --max-steps above {trainer.step} to continue it"))
    if losses and trainer.is_main:
        print(printable(fit_columns([f"done: step {trainer.step}", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                                     f"{time.perf_counter() - start:.1f} s", f"checkpoint in {args.out}"], sep=", ")))
    return 0
