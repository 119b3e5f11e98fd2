"""The `fastformer` command line: train, generate, translate, eval, tokenizer, prepare, export,
info, plot.

    fastformer train --preset tiny --out runs/tiny          # embedded default corpus
    fastformer generate --checkpoint runs/tiny --prompt "def "
    fastformer tokenizer train --data corpus.txt --vocab-size 4096 --out tok
    fastformer prepare --data corpus.txt --tokenizer tok --out data/corpus
    fastformer train --preset small --data data/corpus --out runs/small
    fastformer eval --checkpoint runs/small --data data/corpus
    fastformer export --checkpoint runs/small --format hf --out hf/small
    fastformer train --task reverse --config experiments/configs/tiny_reverse.yaml --out runs/reverse
    fastformer translate --checkpoint runs/reverse --text "hello123" --beam 4
    fastformer eval --checkpoint runs/reverse                # held-out strings; --data FILE for pairs
    fastformer info --preset small
    fastformer plot runs/tiny runs/small --out loss.png

Every subcommand is one `cmd_<name>(args)` function; `build_parser()` wires them up. A
FastformerError (bad config key, missing data file, corrupt checkpoint, ...) or a file error
(OSError: no such file, a directory, no permission) is printed as one line and exits with 2; any
other exception is a bug in fastformer and keeps its traceback.
"""

import argparse
import os
import platform
import sys
import warnings

import numpy as np

from fastformer.errors import FastformerError


# ----------------------------------------------------------------------------- train
def resolve_train_config(args):
    """The RunConfig a `train` command asks for, validated before any work."""
    from fastformer.training.checkpoint import latest_checkpoint
    from fastformer.training.config import RunConfig, apply_overrides, load_config, preset

    if args.resume:
        if args.preset or args.config or args.seed is not None or args.task or args.init_from:
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
        if args.config:
            config = load_config(args.config, base=config)
    else:
        # the presets size language models; an encoder-decoder task starts from the defaults
        task = args.task or (load_config(args.config).data.task if args.config else "text")
        if task == "text":
            config = preset(args.preset or "tiny")
        elif args.preset:
            raise FastformerError(f"--preset sizes language models, not the {task} task: size an encoder-decoder "
                                  f"with --config (e.g. experiments/configs/tiny_reverse.yaml) or "
                                  f"--set seq2seq.KEY=VALUE")
        else:
            config = RunConfig()
        if args.config:
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
    return apply_overrides(config, flags + list(args.set))


def default_out_dir(args):
    if args.init_from and not args.config:
        return os.path.join("runs", os.path.basename(os.path.normpath(args.init_from)) + "-finetune")
    if args.config:
        return os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    return os.path.join("runs", args.preset or args.task or "tiny")


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


def cmd_train(args):
    import time

    from fastformer import get_backend, set_backend
    from fastformer.training.checkpoint import checkpoint_dirs
    from fastformer.training.distributed import get_comm
    from fastformer.training.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, fit_columns

    if args.out is None:
        if args.resume:
            raise FastformerError("--resume needs --out RUN_DIR: the run to continue")
        args.out = default_out_dir(args)
    config = resolve_train_config(args)
    if args.backend:
        set_backend(args.backend)
    comm = get_comm(True if args.distributed else None)  # MPI under mpiexec; mpi4py imported only then
    trainer = Trainer(config, args.out, resume=args.resume, comm=comm, init_from=args.init_from)
    ranks = f"; {comm.size} ranks" if comm.size > 1 else ""
    if trainer.is_main:
        source = [f"weights from {trainer.init_from}"] if trainer.init_from else []
        print(fit_columns([f"training {trainer.model.num_parameters():,} parameters ({trainer.config.kind}) on "
                           f"{trainer.task.describe()}", *source, f"backend {get_backend()}{ranks}",
                           f"run directory {args.out}", f"step {trainer.step} of {config.train.max_steps}"],
                          sep="; "), flush=True)
    start = time.perf_counter()
    try:
        losses = trainer.train()
    except (NonFiniteLossError, FastformerError) as e:  # raised on every rank at once: rank 0 says it
        if trainer.is_main:
            raise
        return 1 if isinstance(e, NonFiniteLossError) else 2
    except TrainingInterrupted as e:  # the first Ctrl-C: every rank stopped after the same step, checkpointed
        if trainer.is_main:
            print(f"\nfastformer train: stopped by {e.signal} at step {e.step} of {config.train.max_steps}; "
                  f"wrote {e.checkpoint}\nresume with: {resume_command(args, comm)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the newest complete checkpoint stands
        if trainer.is_main:
            newest = checkpoint_dirs(args.out)
            print(f"\nfastformer train: stopped at once at step {trainer.step}; the newest complete checkpoint is "
                  f"{newest[-1] if newest else 'none'}"
                  + (f"\nresume with: {resume_command(args, comm)}" if newest else ""), file=sys.stderr)
        return 130
    if losses and trainer.is_main:
        print(fit_columns([f"done: step {trainer.step}", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                           f"{time.perf_counter() - start:.1f} s", f"checkpoint in {args.out}"], sep=", "))
    return 0


# -------------------------------------------------------------------------- generate
def stream_text(tokenizer, id_steps, out, stop=()):
    """Write the text of ids arriving one step at a time to `out` as it forms; returns the whole
    text. Stops at the first stop string (not written). Characters that may still change -- an
    incomplete UTF-8 sequence, or the start of a stop string -- are held back until settled."""
    hold = max((len(s) for s in stop), default=1) - 1
    ids, written, text = [], 0, ""
    for nxt in id_steps:
        ids.append(int(nxt))
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        settled = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
        if settled > written:
            out.write(text[written:settled])
            out.flush()
            written = settled
    out.write(text[written:])
    out.flush()
    return text


SAMPLE_SEPARATOR = "-" * 40  # between the samples of generate --num-samples


def read_prompt(args):
    """The prompt text of --prompt or --prompt-file (the whole file as it is; "-": standard input)."""
    if args.prompt_file is None:
        if not args.prompt:
            raise FastformerError("--prompt is empty: give at least one character to continue")
        return args.prompt
    from fastformer.data.text import load_text

    if args.prompt_file != "-":
        return load_text(args.prompt_file, what="--prompt-file", hint="")
    text = sys.stdin.read()
    if not text:
        raise FastformerError("--prompt-file - (standard input) is empty: give at least one character to continue")
    return text


def cmd_generate(args):
    from fastformer import set_backend
    from fastformer.errors import check_int
    from fastformer.generation.sampling import generate_tokens
    from fastformer.training.checkpoint import load_model

    n = check_int("--num-samples", args.num_samples)
    if n > 1 and (args.beam != 1 or args.temperature == 0):
        raise FastformerError(f"--num-samples {n} needs sampling (--temperature > 0, --beam 1): "
                              f"{'beam search' if args.beam != 1 else 'greedy decoding'} gives the same "
                              f"continuation every time")
    text = read_prompt(args)
    if args.backend:
        set_backend(args.backend)
    model, tokenizer, _ = load_model(args.checkpoint)
    prompt = tokenizer.encode(text)
    if prompt.size == 0:
        raise FastformerError("the prompt is empty: give at least one character to continue")
    stop = args.stop or ()
    if args.beam != 1:  # beam search: the whole continuation at once, then cut at a stop string
        if args.repetition_penalty is not None:
            raise FastformerError("--repetition-penalty applies to sampling, not to --beam")
        out = model.generate(prompt, args.max_new_tokens, beam_size=args.beam, eos_id=tokenizer.eos_id,
                             length_penalty=args.length_penalty)
        samples = [out[prompt.size:].tolist()]
    else:
        # the samples are the rows of one batch: one prompt, n rows, one sampling stream
        steps = generate_tokens(model, np.tile(prompt, (n, 1)), args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id,
                                repetition_penalty=args.repetition_penalty)
        if n == 1:
            samples = [(nxt[0] for nxt in steps)]  # streamed, as each token comes
        else:
            rows = np.stack(list(steps), axis=1) if args.max_new_tokens else np.zeros((n, 0), np.int64)
            samples = [row[:int(np.argmax(row == tokenizer.eos_id))] if (row == tokenizer.eos_id).any() else row
                       for row in rows]
    for i, ids in enumerate(samples):
        if i:
            sys.stdout.write(SAMPLE_SEPARATOR + "\n")
        sys.stdout.write(text)
        stream_text(tokenizer, ids, sys.stdout, stop=stop)
        sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------------- translate
def load_seq2seq(path):
    """(Seq2SeqTransformer, Checkpoint) from an encoder-decoder checkpoint or run directory."""
    from fastformer.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.config.kind != "seq2seq":
        raise FastformerError(f"{ckpt.path} holds a language model (data.task=text), not an encoder-decoder: "
                              f"use fastformer generate with it")
    return ckpt.new_model(), ckpt


def cmd_translate(args):
    from fastformer import set_backend
    from fastformer.generation.search import translate

    if args.backend:
        set_backend(args.backend)
    model, ckpt = load_seq2seq(args.checkpoint)
    texts = [t.lower() for t in args.text] if ckpt.config.data.lowercase else args.text  # as trained
    outputs = translate(model, texts, ckpt.tokenizers["src"], ckpt.tokenizers["tgt"], beam_size=args.beam,
                        length_penalty=args.length_penalty, truncate=args.truncate, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for out in outputs:
        print(out)
    return 0


# -------------------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args):
    from fastformer.data.bpe import BPETokenizer
    from fastformer.data.tokenizer import CharTokenizer

    if args.kind == "bpe":
        if args.vocab_size is None:
            raise FastformerError("tokenizer train --kind bpe needs --vocab-size N (e.g. 4096)")
        tok = BPETokenizer.train(args.data, args.vocab_size, show_progress=sys.stderr.isatty())
    else:
        if args.vocab_size is not None:
            raise FastformerError("--vocab-size does not apply to --kind char: its vocabulary is every character "
                                  "of the data")
        tok = CharTokenizer.train(args.data)
    tok.save(args.out)
    print(f"wrote a {tok.kind} tokenizer with {tok.vocab_size} ids to {os.path.join(args.out, 'tokenizer.json')}")
    return 0


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args):
    from fastformer.data.datasets import fetch_dataset
    from fastformer.data.prepare import prepare
    from fastformer.data.tokenizer import ByteTokenizer, load_tokenizer

    if (args.data is None) == (args.dataset is None):
        raise FastformerError("prepare needs either --data FILE... or --dataset NAME")
    files, val_files = args.data, args.val_data
    if args.dataset:
        if val_files:
            raise FastformerError("--val-data does not apply to --dataset, which brings its own split")
        files, val_files = fetch_dataset(args.dataset, args.cache_dir)
    if args.tokenizer == "byte":
        tok = ByteTokenizer()
    elif os.path.isdir(args.tokenizer):
        tok = load_tokenizer(args.tokenizer)
    else:
        raise FastformerError(f"--tokenizer {args.tokenizer!r} is neither 'byte' nor a directory holding a "
                              f"tokenizer.json (make one with fastformer tokenizer train)")
    meta = prepare(files, tok, args.out, val_fraction=args.val_fraction, val_files=val_files)
    s = meta["splits"]
    print(f"wrote {s['train']['tokens']:,} training and {s['val']['tokens']:,} validation tokens "
          f"({meta['dtype']}, {tok.kind} tokenizer, {tok.vocab_size} ids) to {args.out}")
    return 0


# ------------------------------------------------------------------------------- eval
def cmd_eval(args):
    import json

    from fastformer import set_backend
    from fastformer.data.prepare import is_prepared_dir, load_prepared
    from fastformer.data.text import load_text
    from fastformer.training.checkpoint import load_model
    from fastformer.training.evaluate import evaluate_lm

    if args.backend:
        set_backend(args.backend)
    if is_seq2seq_checkpoint(args.checkpoint):
        return eval_seq2seq(args)
    if args.data is None:
        raise FastformerError("eval of a language model needs --data: a UTF-8 text file or prepared directory")
    model, tokenizer, config = load_model(args.checkpoint)
    if is_prepared_dir(args.data):
        prepared = load_prepared(args.data)
        if prepared.tokenizer.vocab_size != tokenizer.vocab_size or prepared.tokenizer.kind != tokenizer.kind:
            raise FastformerError(f"{args.data!r} was prepared with a {prepared.tokenizer.kind} tokenizer of "
                                  f"{prepared.tokenizer.vocab_size} ids, but the checkpoint's is {tokenizer.kind} "
                                  f"with {tokenizer.vocab_size}: prepare the text with the checkpoint's tokenizer")
        ids = getattr(prepared, args.split)
    else:
        ids = tokenizer.encode(load_text(args.data))
    batch_size = args.batch_size or config.train.batch_size
    seq_len = min(args.seq_len or config.train.seq_len, model.config.max_seq_len)
    m = evaluate_lm(model, ids, batch_size, seq_len, args.max_batches, tokenizer.byte_lengths())
    m.update(data=args.data, checkpoint=args.checkpoint, seq_len=seq_len)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"loss {m['loss']:.4f} | ppl {m['ppl']:.3f} | bits/byte {m['bits_per_byte']:.4f} | "
              f"acc {m['acc']:.4f} | {m['tokens']:,} tokens, {m['bytes']:,} bytes, seq_len {seq_len}")
    return 0


def is_seq2seq_checkpoint(path):
    """Whether `path` is an encoder-decoder checkpoint (or run) directory, from its config alone."""
    from fastformer.training.checkpoint import STATE_FILE, resolve_checkpoint
    from fastformer.training.config import load_config

    if not os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, "config.json")):
        return False  # a Hugging Face directory
    return load_config(os.path.join(resolve_checkpoint(path), "config.yaml")).kind == "seq2seq"


def eval_seq2seq(args):
    """Loss, token accuracy, exact match and BLEU of an encoder-decoder checkpoint on --data pairs,
    or on the run's own validation data (held-out strings for the synthetic tasks)."""
    import json

    from fastformer.data.pairs import fit_pairs, read_pairs
    from fastformer.training.evaluate import evaluate_seq2seq
    from fastformer.training.tasks import Seq2SeqTask

    model, ckpt = load_seq2seq(args.checkpoint)
    config, (src_tok, tgt_tok) = ckpt.config, ckpt.tokenizers.values()
    skipped = {}
    if args.data:
        pairs, read_skips = read_pairs(args.data, lowercase=config.data.lowercase)
        pairs = pairs[:args.examples]
        pairs, skipped["too long"] = fit_pairs(pairs, src_tok, tgt_tok, model.config.max_src_len,
                                               model.config.max_tgt_len)
        skipped.update(read_skips)
        what = args.data
    else:
        task = Seq2SeqTask(config, ckpt.tokenizers)
        if config.data.task == "pairs":
            pairs, what = task.val_pairs[:args.examples], f"the validation pairs of {config.data.path}"
        else:
            pairs, what = task.heldout(args.examples or 1000), f"held-out {config.data.task} strings"
    skipped = {k: v for k, v in skipped.items() if v}
    if not pairs:
        raise FastformerError(f"no pair of {what} fits the model (skipped: {skipped or 'none'})")
    m = evaluate_seq2seq(model, pairs, src_tok, tgt_tok, args.batch_size or config.train.batch_size,
                         beam_size=args.beam, length_penalty=args.length_penalty)
    decoding = "greedy" if args.beam == 1 else f"beam {args.beam}"
    m.update(data=what, checkpoint=args.checkpoint, decoding=decoding, skipped=skipped)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"loss {m['loss']:.4f} | token acc {m['token_acc']:.4f} | exact match {m['exact_match']:.4f} "
              f"({decoding}) | BLEU {m['bleu']:.2f} ({m['bleu_impl']}) | {m['examples']:,} examples from {what}"
              + (f"; skipped {', '.join(f'{n:,} {why}' for why, n in skipped.items())}" if skipped else ""))
    return 0


# ----------------------------------------------------------------------------- export
EXPORT_FORMATS = ("hf",)


def cmd_export(args):
    from fastformer.training.checkpoint import load_model
    from fastformer.training.export import export_hf

    if args.format not in EXPORT_FORMATS:
        raise FastformerError(f"unknown export format {args.format!r}: valid formats are "
                              f"{', '.join(EXPORT_FORMATS)}")
    model, tokenizer, _ = load_model(args.checkpoint)
    wrote = export_hf(model, tokenizer, args.out)
    print(f"wrote {', '.join(wrote)} to {args.out}")
    return 0


# ------------------------------------------------------------------------------ info
def cmd_info(args):
    from fastformer import Seq2SeqTransformer, TransformerLM, __version__, get_backend
    from fastformer.training.distributed import get_comm

    comm = get_comm()  # first: under mpiexec it sets the ranks' share of the cores before the kernels load
    if comm.rank:
        return 0
    print(f"fastformer {__version__}  python {platform.python_version()}  numpy {np.__version__}")
    if comm.size > 1:
        print(f"mpi: {comm.size} ranks, {comm.local_size} on this node (rank 0's)")
    print(f"backend: {get_backend()}  (FASTFORMER_BACKEND={os.environ.get('FASTFORMER_BACKEND', 'unset')})")
    from fastformer.kernels.threads import thread_info

    for key, value in thread_info().items():
        print(f"{key}: {value}")
    if args.preset or args.config:
        from fastformer.training.config import load_config, preset

        config = preset(args.preset or "tiny")
        if args.config:
            config = load_config(args.config, base=config)
        m = config.model_config()
        if config.kind == "lm":
            n = TransformerLM(m).num_parameters()
            shape = f"layers {m.n_layers}, context {m.max_seq_len}"
        else:
            n = Seq2SeqTransformer(m).num_parameters()
            shape = (f"{m.n_encoder_layers} encoder + {m.n_decoder_layers} decoder layers, source/target "
                     f"lengths {m.max_src_len}/{m.max_tgt_len}, vocabularies {m.src_vocab_size}/{m.tgt_vocab_size}")
        print(f"config {args.config or args.preset} ({config.kind}): d_model {m.d_model}, heads {m.n_heads}, "
              f"d_ff {m.d_ff}, {shape}: {n:,} parameters, {n * 4 / 1e6:.2f} MB (float32)")
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args):
    from fastformer.cli.bench import main

    return main(args)


# ------------------------------------------------------------------------------ plot
def cmd_plot(args):
    from fastformer.cli.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


# ---------------------------------------------------------------------------- parser
BACKEND_HELP = "kernel backend: auto, numpy or numba (default: FASTFORMER_BACKEND, else auto)"


def _has_default(action):
    """Whether an option's default is worth printing: not None, False or an empty list, for which
    the help says what happens without the option."""
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d == [] or d is argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it (`_has_default`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not _has_default(action):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands' --help show defaults (HelpFormatter), also of the
    options that have no help text."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def _add_action(self, action):
        if action.help is None and _has_default(action):
            action.help = "(default: %(default)s)"
        return super()._add_action(action)


def build_parser():
    from fastformer.training.config import PRESETS, TASKS

    parser = Parser(prog="fastformer", description="Small Transformers on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--backend", help=BACKEND_HELP)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; default: none)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--prompt-file", metavar="FILE", help="continue the text of this UTF-8 file, as it is "
                                                         "(\"-\": standard input)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help=f"sample N continuations of the prompt, separated by a line of {len(SAMPLE_SEPARATOR)} "
                        f"dashes")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, ties kept (default: all)")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens with mass >= p "
                                               "(default: all)")
    p.add_argument("--seed", type=int, help="seed of the sampling generator (default: fresh each run)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in the text "
                                                            "(default: off)")
    p.add_argument("--stop", action="append", help="stop before this string (repeatable; default: <eos> only, "
                                                   "which always stops)")
    p.add_argument("--beam", type=int, default=1, help="beam search with this many beams (default 1: sampling, "
                                                       "or greedy at temperature 0)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("translate", help="decode source texts with an encoder-decoder checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--text", required=True, action="append", help="source text (repeatable: one output line each)")
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    p.add_argument("--truncate", action="store_true", help="cut a source longer than the model's max_src_len "
                                                           "instead of refusing it")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy "
                                                                  "or beam search)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (ties kept)")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens with mass >= p")
    p.add_argument("--seed", type=int, help="seed of the sampling generator")
    p.add_argument("--backend", help="kernel backend: auto, numpy or numba")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="learn a BPE or char vocabulary from text files")
    p.add_argument("--data", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size including 3 specials (e.g. 4096)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="encode text once into memory-mapped token files")
    p.add_argument("--data", nargs="+", help="UTF-8 text files, in order")
    p.add_argument("--dataset", help="download a public corpus instead: tinyshakespeare or tinystories")
    p.add_argument("--val-data", nargs="+", help="text files for the validation split (default: the last "
                                                 "--val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--tokenizer", default="byte", help="byte or a tokenizer directory (default byte)")
    p.add_argument("--cache-dir", help="where --dataset downloads go (default ~/.cache/fastformer/datasets)")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json, tokenizer.json")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eval", help="language model: loss, perplexity, bits per byte, accuracy; encoder-decoder: "
                                    "loss, token accuracy, exact match, BLEU")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", help="language model: UTF-8 text file or prepared directory (required); "
                                  "encoder-decoder: a source<TAB>target file (default: the run's validation "
                                  "pairs, or held-out strings of a synthetic task)")
    p.add_argument("--beam", type=int, default=1, help="encoder-decoder: beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="encoder-decoder: beam length penalty")
    p.add_argument("--examples", type=int, help="encoder-decoder: held-out strings of a synthetic task (default "
                                                "1000), or at most this many pairs")
    p.add_argument("--split", choices=("val", "train"), default="val", help="split of a prepared directory")
    p.add_argument("--max-batches", type=int, help="at most this many batches (default: all the text)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the run's train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", help="kernel backend: auto, numpy or numba")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint in another format")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--format", required=True, help=f"one of: {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="show the backend, versions, threads and a config's size")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="tiny, small or medium")
    g.add_argument("--config", help="YAML run config")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="plot train and validation loss of runs against step")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="time full training steps of a preset model")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--backend", choices=["auto", "numpy", "numba"], default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    from fastformer.training.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    # a warning is a line for the user, not a source location
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"fastformer {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except (FastformerError, OSError) as e:  # bad input; anything else is a bug and shows its traceback
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"fastformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"fastformer {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfastformer {args.command}: interrupted; a training run continues from its newest "
              f"checkpoint with --resume", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
