"""The `fastformer` command line: train, generate, translate, eval, tokenizer, prepare, export,
info, plot.

    fastformer train --preset tiny --out runs/tiny          # embedded default corpus
    fastformer generate --checkpoint runs/tiny --prompt "def "
    fastformer tokenizer train --data corpus.txt --vocab-size 4096 --out tok
    fastformer prepare --data corpus.txt --tokenizer tok --out data/corpus
    fastformer train --preset small --data data/corpus --out runs/small
    fastformer eval --checkpoint runs/small                  # the run's own validation split
    fastformer export --checkpoint runs/small --format hf --out hf/small
    fastformer train --task reverse --config experiments/configs/tiny_reverse.yaml --out runs/reverse
    fastformer translate --checkpoint runs/reverse --text "hello123" --beam 4
    fastformer translate --checkpoint runs/enfr --input sentences.txt --lang fr   # or --input - (stdin)
    fastformer eval --checkpoint runs/reverse                # held-out strings; --data FILE for pairs
    fastformer info --preset small                           # exact parameter count
    fastformer info --params 2M-3M --set model.n_layers=4    # model shapes in a budget
    fastformer plot runs/tiny runs/small --out loss.png

Every subcommand is one `cmd_<name>(args)` function; `build_parser()` wires them up. A
FastformerError (bad config key, missing data file, corrupt checkpoint, ...) or a file error
(OSError: no such file, a directory, no permission) is printed as one line and exits with 2; any
other exception is a bug in fastformer and keeps its traceback.
"""

import argparse
import os
import platform
import re
import sys
import warnings

import numpy as np

from fastformer.errors import FastformerError, check_int, check_memory, error_line, format_bytes


# ----------------------------------------------------------------------------- train
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
    if args.backend is not None:  # '' is refused by name, not taken for the default
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
    if not losses and trainer.is_main:  # a resumed run that had already finished
        print(f"nothing to train: the run in {args.out} is at step {trainer.step} = train.max_steps; give "
              f"--max-steps above {trainer.step} to continue it")
    if losses and trainer.is_main:
        print(fit_columns([f"done: step {trainer.step}", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                           f"{time.perf_counter() - start:.1f} s", f"checkpoint in {args.out}"], sep=", "))
    return 0


def refuse_options(args, names, applies_to):
    """FastformerError naming the options of `names` the user gave (not None): they apply to
    `applies_to` only, and ignoring them would answer another question than the one asked."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise FastformerError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {applies_to}")


def check_finite_weights(model, path):
    """Refuse a model holding NaN or inf weights: whatever it printed would be garbage."""
    bad = int(np.count_nonzero(~np.isfinite(model.flat.data)))
    if bad:
        raise FastformerError(f"{path} holds {bad:,} non-finite (NaN or inf) weights of {model.flat.data.size:,}: "
                              f"it cannot give results; use an earlier checkpoint")


def check_finite_loss(m, what):
    if not np.isfinite(m["loss"]):
        raise FastformerError(f"the loss on {what} is not finite ({m['loss']}): the model overflows on this data")


def option_int(args, name, default, maximum=None):
    """The integer option `name` as given (in [1, maximum]) or, when not given, `default`."""
    value = getattr(args, name)
    return default if value is None else check_int(f"--{name.replace('_', '-')}", value, maximum=maximum)


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
    from fastformer.generation.sampling import cut_at_eos, generate_tokens
    from fastformer.training.checkpoint import load_model

    n = check_int("--num-samples", args.num_samples)
    if n > 1 and (args.beam != 1 or args.temperature == 0):
        raise FastformerError(f"--num-samples {n} needs sampling (--temperature > 0, --beam 1): "
                              f"{'beam search' if args.beam != 1 else 'greedy decoding'} gives the same "
                              f"continuation every time")
    text = read_prompt(args)
    if args.backend is not None:  # '' is refused by name, not taken for the default
        set_backend(args.backend)
    model, tokenizer, _ = load_model(args.checkpoint)
    check_finite_weights(model, args.checkpoint)
    if "" in (args.stop or ()):
        raise FastformerError("--stop '' would stop before the first token: give a non-empty stop string")
    prompt = tokenizer.encode(text)
    if prompt.size == 0:
        raise FastformerError("the prompt is empty: give at least one character to continue")
    stop = args.stop or ()
    if args.beam != 1:  # beam search: the whole continuation at once, then cut at a stop string
        refuse_options(args, ("repetition_penalty", "top_k", "top_p", "seed"), "sampling, not to --beam")
        out = model.generate(prompt, args.max_new_tokens, beam_size=args.beam, eos_id=tokenizer.eos_id,
                             length_penalty=1.0 if args.length_penalty is None else args.length_penalty)
        samples = [out[prompt.size:].tolist()]
    else:
        refuse_options(args, ("length_penalty",), "beam search (--beam N > 1), not to sampling")
        # the samples are the rows of one batch: one prompt, n rows, one sampling stream
        steps = generate_tokens(model, np.tile(prompt, (n, 1)), args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id,
                                repetition_penalty=args.repetition_penalty)
        if n == 1:
            samples = [(nxt[0] for nxt in steps)]  # streamed, as each token comes
        else:
            rows = np.stack(list(steps), axis=1) if args.max_new_tokens else np.zeros((n, 0), np.int64)
            samples = [cut_at_eos(row, tokenizer.eos_id) for row in rows]
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

    ckpt = load_checkpoint(path, "seq2seq")
    return ckpt.new_model(), ckpt


def source_lines(args):
    """(1-based line number, text) of every source: the --text values, or the lines of --input
    (a file, or - for stdin), read as they come."""
    if (args.text is None) == (args.input is None):
        raise FastformerError("translate needs either --text TEXT (repeatable) or --input FILE (- for stdin)")
    if args.text is not None:
        yield from enumerate(args.text, 1)
        return
    if args.input == "-":
        f = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, decoded line by line
    elif not os.path.isfile(args.input):
        raise FastformerError(f"--input file {args.input!r} does not exist")
    else:
        f = open(args.input, "rb")
    try:
        for n, line in enumerate(f, 1):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise FastformerError(f"--input {args.input}: line {n} is not UTF-8 text ({e})") from None
            yield n, line.rstrip("\r\n")
    finally:
        if args.input != "-":
            f.close()


def batched(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def recase(output, source):
    """`output` with its first letter upper-cased when the source's first letter is (for a run that
    lower-cased its data: the model writes lower case only)."""
    first = next((c for c in source if c.isalpha()), "")
    i = next((i for i, c in enumerate(output) if c.isalpha()), None)
    return output if i is None or not first.isupper() else output[:i] + output[i].upper() + output[i + 1:]


def format_unknown(unknown, what):
    """One warning of the unknown pieces of a batch: {piece: [line numbers]}."""
    shown = [f"{p!r} (line{'s' if len(ns) > 1 else ''} {', '.join(map(str, ns[:5]))}{', ...' if len(ns) > 5 else ''})"
             for p, ns in list(unknown.items())[:20]]
    more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return f"{what} outside the source vocabulary, read as <unk>: {', '.join(shown)}{more}"


def cmd_translate(args):
    from fastformer import set_backend
    from fastformer.data.pairs import readable, unknown_pieces
    from fastformer.errors import check_int
    from fastformer.generation.search import translate

    if args.backend is not None:  # '' is refused by name, not taken for the default
        set_backend(args.backend)
    check_int("--batch-size", args.batch_size)
    model, ckpt = load_seq2seq(args.checkpoint)
    check_finite_weights(model, args.checkpoint)
    src_tok, tgt_tok = ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    lower, S = ckpt.config.data.lowercase, model.config.max_src_len
    what = "words" if src_tok.kind == "word" else "characters"
    for batch in batched(source_lines(args), args.batch_size):
        texts, unknown = {}, {}  # line number -> source to translate; unknown piece -> line numbers
        for n, line in batch:
            text = line.lower() if lower else line  # as trained
            for piece in dict.fromkeys(unknown_pieces(src_tok, text)):
                unknown.setdefault(piece, []).append(n)
            length = len(src_tok.encode(text))
            if length > S:
                warn("translate", f"line {n}: {length} source tokens, more than the model's max_src_len={S}: "
                                  + (f"translated from its first {S}" if args.truncate else
                                     "skipped, its output line is empty (--truncate translates its first tokens)"))
                if not args.truncate:
                    continue
            if line.strip():
                texts[n] = text
        if unknown:
            warn("translate", format_unknown(unknown, what))
        outputs = translate(model, list(texts.values()), src_tok, tgt_tok, beam_size=args.beam,
                            length_penalty=args.length_penalty, truncate=True, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            decode=lambda ids: readable(tgt_tok, ids, args.lang)) if texts else []
        done = dict(zip(texts, outputs))
        for n, line in batch:  # one output line per source line, empty for a blank or skipped one
            out = done.get(n, "")
            print(recase(out, line) if lower else out)
        sys.stdout.flush()
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
    if args.dataset is not None:
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
def warn(command, message):
    """One warning line on stderr."""
    print(f"fastformer {command}: warning: {message}", file=sys.stderr)


def run_data_path(config, ckpt_path):
    """The data file a run trained on, checked to be here (a relative path is relative to where
    training ran)."""
    path = config.data.path
    if path and not os.path.exists(path):
        raise FastformerError(f"the run {ckpt_path} trained on {path!r}, which is not here (a relative path is "
                              f"relative to where training ran): pass the data with --data")
    return path


def check_run_data(ckpt, fingerprint, what):
    """Warn when the data the run names is no longer the data it trained on."""
    if ckpt.state.get("data_sha256") not in (None, fingerprint):
        warn("eval", f"{what} changed since training (its fingerprint differs from the checkpoint's): its "
                     f"held-out split is not the one the trainer scored")


def lm_eval_tokens(args, model, tokenizer, config, ckpt, seq_len):
    """(ids, description, default max_batches) of what `eval` scores for a language model: the
    run's own validation split (the trainer's windows by default) without --data, else --split
    of a text file (split as training splits it) or of a prepared directory."""
    from fastformer.data.prepare import is_prepared_dir, load_prepared
    from fastformer.data.text import load_text, split_ids

    split, t = args.split or "val", config.train
    fraction = f"its last {100 * config.data.val_fraction:g}%, as training splits it"
    if args.data is None:
        from fastformer.training.tasks import LMTask

        if ckpt is None:
            raise FastformerError(f"{args.checkpoint} is a Hugging Face directory with no run data: pass the text "
                                  f"to score with --data FILE")
        if split == "all":
            raise FastformerError("--split all applies to a text file (--data FILE); the run's data has a train and "
                                  "a val split")
        path = run_data_path(config, ckpt.path)
        task = LMTask(config, {"tokenizer": tokenizer})  # the trainer's data and split
        check_run_data(ckpt, task.fingerprint, f"the run's data {path or '(the embedded corpus)'}")
        ids = task.val_ids if split == "val" else task.train_ids
        what = f"the {split} split of the run's data, {path or 'the embedded stdlib-documentation corpus'}"
        if not is_prepared_dir(path):
            what += f" ({fraction})" if split == "val" else " (all but its validation tokens)"
        return ids, what, t.eval_batches if split == "val" else None
    if is_prepared_dir(args.data):
        prepared = load_prepared(args.data)
        if prepared.tokenizer.vocab_size != tokenizer.vocab_size or prepared.tokenizer.kind != tokenizer.kind:
            raise FastformerError(f"{args.data!r} was prepared with a {prepared.tokenizer.kind} tokenizer of "
                                  f"{prepared.tokenizer.vocab_size} ids, but the checkpoint's is {tokenizer.kind} "
                                  f"with {tokenizer.vocab_size}: prepare the text with the checkpoint's tokenizer")
        if split == "all":
            raise FastformerError(f"--split all applies to a text file; the prepared directory {args.data} has "
                                  f"a train and a val split: choose one")
        return getattr(prepared, split), f"the {split} split of the prepared directory {args.data}", None
    ids = tokenizer.encode(load_text(args.data))
    if split == "all":
        return ids, f"all of {args.data}", None
    train, val = split_ids(ids, config.data.val_fraction, seq_len)
    what = f"the {split} split of {args.data} " + (f"({fraction}; --split all scores the whole file)"
                                                   if split == "val" else "(all but its validation tokens)")
    return (val if split == "val" else train), what, None


def cmd_eval(args):
    import json

    from fastformer import set_backend
    from fastformer.training.checkpoint import load_checkpoint, load_model
    from fastformer.training.evaluate import evaluate_lm

    if args.backend is not None:  # '' is refused by name, not taken for the default
        set_backend(args.backend)
    if is_seq2seq_checkpoint(args.checkpoint):
        return eval_seq2seq(args)
    if args.examples is not None:
        raise FastformerError("--examples applies to an encoder-decoder; a language model's share is --max-batches")
    refuse_options(args, ("beam", "length_penalty"), "an encoder-decoder")
    from fastformer.models.hf import is_hf_dir

    if is_hf_dir(args.checkpoint):
        (model, tokenizer, config), ckpt = load_model(args.checkpoint), None
    else:
        ckpt = load_checkpoint(args.checkpoint)  # a language model: is_seq2seq_checkpoint said so
        model, tokenizer, config = ckpt.new_model(), ckpt.tokenizer, ckpt.config
    check_finite_weights(model, args.checkpoint)
    batch_size = option_int(args, "batch_size", config.train.batch_size)
    seq_len = option_int(args, "seq_len", min(config.train.seq_len, model.config.max_seq_len), model.config.max_seq_len)
    ids, what, default_batches = lm_eval_tokens(args, model, tokenizer, config, ckpt, seq_len)
    max_batches = option_int(args, "max_batches", default_batches)
    m = evaluate_lm(model, ids, batch_size, seq_len, max_batches, tokenizer.byte_lengths())
    check_finite_loss(m, what)
    windows = m["tokens"] // seq_len
    share = (f"the trainer's {max_batches} batches of {batch_size}; --max-batches N for more"
             if default_batches and args.max_batches is None else "evenly spread")
    m.update(data=what, split=args.split or "val", checkpoint=args.checkpoint, seq_len=seq_len, windows=windows,
             split_tokens=len(ids))
    if args.json:
        print(json.dumps(m))
    else:
        print(f"scored {what}:\n  {windows:,} windows of {seq_len} tokens = {m['tokens']:,} of its {len(ids):,} "
              f"({share})")
        print(f"loss {m['loss']:.4f} | ppl {m['ppl']:.3f} | bits/byte {m['bits_per_byte']:.4f} | "
              f"acc {m['acc']:.4f} | {m['bytes']:,} bytes")
    return 0


def is_seq2seq_checkpoint(path):
    """Whether `path` is an encoder-decoder checkpoint (or run) directory, from its config alone."""
    from fastformer.models.hf import is_hf_dir
    from fastformer.training.checkpoint import resolve_checkpoint
    from fastformer.training.config import load_config

    if is_hf_dir(path):
        return False
    return load_config(os.path.join(resolve_checkpoint(path), "config.yaml")).kind == "seq2seq"


def seq2seq_eval_pairs(args, ckpt, model):
    """(pairs, description, skipped) of what `eval` scores for an encoder-decoder: without --data
    the trainer's validation pairs (held-out strings of a synthetic task); with --data FILE its
    --split as training splits a pairs file (the run's seed, val_fraction, max_pairs, ...), or all
    of it. Pairs too long for the model are skipped and counted."""
    import dataclasses

    from fastformer.data.pairs import fit_pairs, read_pairs
    from fastformer.training.tasks import Seq2SeqTask

    config, (src_tok, tgt_tok) = ckpt.config, ckpt.tokenizers.values()
    split, d, t = args.split or "val", ckpt.config.data, ckpt.config.train
    n_trainer = t.eval_batches * t.batch_size
    if args.data is not None and d.task != "pairs":  # a synthetic run trained on no file: all of it is scored
        if split != "all" and args.split is not None:
            raise FastformerError(f"--split {split} splits a pairs file as its run's training did, but a {d.task} run "
                                  f"trained on no file: leave --split out (or --split all) to score all of {args.data}")
        split = "all"
    if args.data is None and d.task != "pairs":
        if split != "val":
            raise FastformerError(f"--split {split} needs --data FILE: a {d.task} run's training strings are drawn "
                                  f"fresh every step, its held-out strings are the val split")
        if args.examples is None:
            return (Seq2SeqTask(config, ckpt.tokenizers).val_pairs,
                    f"the trainer's {n_trainer:,} held-out {d.task} strings (--examples N for another number)", {})
        check_memory(f"--examples {args.examples:,} held-out strings", args.examples * 2 * (d.max_len + 64))
        return Seq2SeqTask(config, ckpt.tokenizers).heldout(args.examples), f"held-out {d.task} strings", {}
    path = run_data_path(config, ckpt.path) if args.data is None else args.data
    if split == "all":
        if args.data is None:
            raise FastformerError("--split all applies to a pairs file (--data FILE); the run's data has a train "
                                  "and a val split")
        pairs, skipped = read_pairs(path, lowercase=d.lowercase)
        pairs, skipped["too long"] = fit_pairs(pairs[:args.examples], src_tok, tgt_tok, model.config.max_src_len,
                                               model.config.max_tgt_len)
        return pairs, f"all pairs of {path}", skipped
    task = Seq2SeqTask(dataclasses.replace(config, data=dataclasses.replace(d, path=path)), ckpt.tokenizers)
    if args.data is None:
        check_run_data(ckpt, task.fingerprint, f"the run's data {path}")
    if split == "val":
        pairs = task.val_pairs
        if args.data is None and args.examples is None:
            more = "; --examples N for more" if len(pairs) > n_trainer else ""
            train = ", which are its training pairs: data.val_fraction is 0" if not d.val_fraction else ""
            return (pairs[:n_trainer], f"the trainer's validation pairs of {path} ({min(n_trainer, len(pairs)):,} of "
                                       f"{len(pairs):,}{more}{train})", task.skipped)
        what = f"the validation pairs of {path} (split as training splits it)"
    else:
        pairs, n_long = fit_pairs(task.train_pairs, src_tok, tgt_tok, model.config.max_src_len,
                                  model.config.max_tgt_len)
        what, skipped = f"the training pairs of {path} (split as training splits it)", {"too long": n_long}
        return pairs[:args.examples], what, skipped
    return pairs[:args.examples], what, task.skipped


def eval_seq2seq(args):
    """Loss, token accuracy, exact match and BLEU of an encoder-decoder checkpoint (see
    seq2seq_eval_pairs for the pairs it scores)."""
    import json

    from fastformer.training.evaluate import evaluate_seq2seq

    if args.max_batches is not None or args.seq_len is not None:
        raise FastformerError("--max-batches and --seq-len apply to a language model; an encoder-decoder scores "
                              "--examples N pairs")
    option_int(args, "examples", None)
    beam = option_int(args, "beam", 1)
    if beam == 1:
        refuse_options(args, ("length_penalty",), "beam search (--beam N > 1), not to greedy decoding")
    model, ckpt = load_seq2seq(args.checkpoint)
    check_finite_weights(model, args.checkpoint)
    config, (src_tok, tgt_tok) = ckpt.config, ckpt.tokenizers.values()
    batch_size = option_int(args, "batch_size", config.train.batch_size)
    pairs, what, skipped = seq2seq_eval_pairs(args, ckpt, model)
    skipped = {k: v for k, v in skipped.items() if v}
    if not pairs:
        raise FastformerError(f"no pair of {what} fits the model (skipped: {skipped or 'none'})")
    m = evaluate_seq2seq(model, pairs, src_tok, tgt_tok, batch_size, beam_size=beam,
                         length_penalty=1.0 if args.length_penalty is None else args.length_penalty, lang=args.lang)
    check_finite_loss(m, what)
    decoding = "greedy" if beam == 1 else f"beam {beam}"
    m.update(data=what, split=args.split or "val", checkpoint=args.checkpoint, decoding=decoding, skipped=skipped)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"scored {m['examples']:,} examples: {what}"
              + (f"; skipped {', '.join(f'{n:,} {why}' for why, n in skipped.items())}" if skipped else ""))
        standard = ("pip install sacrebleu for it" if m["sacrebleu"] is None else f"{m['sacrebleu']:.2f}")
        print(f"loss {m['loss']:.4f} | token acc {m['token_acc']:.4f} | exact match {m['exact_match']:.4f} "
              f"({decoding})")
        print(f"BLEU {m['bleu']:.2f} on tokens ({m['bleu_impl']}, as val_bleu) | sacreBLEU {standard} on "
              f"detokenized text (13a)")
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
SIZE_KEYS = {"lm": ("d_model", "n_layers", "n_heads", "d_ff"),
             "seq2seq": ("d_model", "n_encoder_layers", "n_heads", "d_ff")}  # what `info --params` varies
BUDGET_WIDTHS = (*range(32, 512, 32), *range(512, 1024, 64), *range(1024, 2049, 128))
BUDGET_DEPTHS = range(1, 25)
BUDGET_ASPECT = (16, 256)  # d_model / depth: the shapes between are all reasonable; outside, too deep or too wide
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)\s*$", re.IGNORECASE)


def parse_budget(text):
    """(low, high) parameter counts of "2M-3M" (suffixes k, M, G; plain or 2e6 numbers too)."""
    parts = text.split("-")
    counts = [_COUNT.match(p) for p in parts]
    if len(parts) != 2 or not all(counts):
        raise FastformerError(f"--params {text!r} must be a range LOW-HIGH such as 2M-3M or 500k-1.5M "
                              f"(suffixes k, M, G)")
    low, high = (round(float(m[1]) * 1000 ** " kmg".index(m[2].lower() or " ")) for m in counts)
    if not 0 < low <= high:
        raise FastformerError(f"--params {text!r} needs 0 < LOW <= HIGH, got {low:,} and {high:,}")
    return low, high


def default_heads(d_model):
    """Heads of about 64 dimensions (GPT-2's head size), a divisor of d_model."""
    h = max(1, round(d_model / 64))
    while d_model % h:
        h -= 1
    return h


def configs_in_budget(model, low, high, pinned=()):
    """Model configs like `model` (an LMConfig or Seq2SeqConfig) whose exact parameter count lies
    in [low, high], sorted by count: width and depth swept over BUDGET_WIDTHS x BUDGET_DEPTHS with
    d_model / depth in BUDGET_ASPECT (a seq2seq model gets as many decoder as encoder layers),
    d_ff = 4 d_model and heads of about 64 dimensions, except the fields named in `pinned`, which
    keep `model`'s values (and are not held to the aspect range).
    Returns [(count, config)]."""
    import dataclasses

    from fastformer.models.config import LMConfig, count_parameters

    width_key, depth_key, heads_key, ff_key = SIZE_KEYS["lm" if isinstance(model, LMConfig) else "seq2seq"]
    widths = [model.d_model] if width_key in pinned else BUDGET_WIDTHS
    depths = [getattr(model, depth_key)] if depth_key in pinned else BUDGET_DEPTHS
    found = []
    for C in widths:
        heads = model.n_heads if heads_key in pinned else default_heads(C)
        if C % heads:
            continue
        for L in depths:
            if not ({width_key, depth_key} & set(pinned) or BUDGET_ASPECT[0] <= C / L <= BUDGET_ASPECT[1]):
                continue
            change = {width_key: C, depth_key: L, heads_key: heads, ff_key: model.d_ff if ff_key in pinned else 4 * C}
            if depth_key == "n_encoder_layers" and "n_decoder_layers" not in pinned:
                change["n_decoder_layers"] = L
            cfg = dataclasses.replace(model, **change)
            n = count_parameters(cfg)
            if low <= n <= high:
                found.append((n, cfg))
    return sorted(found, key=lambda nc: (nc[0], nc[1].d_model))


def info_config(args):
    """The RunConfig `info` sizes (preset or config file, --data, --set) and a note on where its
    vocabulary sizes come from."""
    from fastformer.training.config import apply_overrides, load_config, preset

    config = preset("tiny" if args.preset is None else args.preset)
    if args.config is not None:
        config = load_config(args.config, base=config)
    config = apply_overrides(config, ([f"data.path={args.data}"] if args.data is not None else []) + list(args.set))
    d = config.data
    if config.kind == "seq2seq" and d.task != "pairs":
        from fastformer.training.tasks import Seq2SeqTask

        return Seq2SeqTask(config).config, f"vocabularies from the {d.task} task's alphabet"
    if d.path and not os.path.exists(d.path):
        if args.data:
            raise FastformerError(f"--data {args.data!r} does not exist")
        return config, (f"vocabularies as configured: data.path {d.path} is not here, give --data FILE to take "
                        f"them from the data")
    if config.kind == "seq2seq":
        from fastformer.training.tasks import Seq2SeqTask

        return Seq2SeqTask(config).config, f"{d.tokenizer or 'word'} vocabularies built from {d.path} as training does"
    from fastformer.data.prepare import is_prepared_dir, load_prepared
    from fastformer.data.text import default_corpus, load_text
    from fastformer.data.tokenizer import make_tokenizer
    from fastformer.training.config import match_tokenizer

    if not d.path and d.tokenizer in (None, "byte") and config.model.vocab_size != type(config.model).vocab_size:
        return config, "vocabulary as configured (model.vocab_size; no data given)"
    if is_prepared_dir(d.path):
        tok = load_prepared(d.path).tokenizer
    else:  # only a char vocabulary needs the text
        text = (load_text(d.path) if d.path else default_corpus()) if d.tokenizer == "char" else None
        tok = make_tokenizer(d.tokenizer or "byte", text)
    return match_tokenizer(config, tok), f"the {tok.kind} tokenizer's vocabulary ({d.path or 'embedded corpus'})"


def describe_model(m):
    """One line of a model config's shape."""
    from fastformer.models.config import LMConfig

    if isinstance(m, LMConfig):
        return (f"d_model {m.d_model}, heads {m.n_heads}, d_ff {m.d_ff}, layers {m.n_layers}, context "
                f"{m.max_seq_len}, vocabulary {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'}")
    return (f"d_model {m.d_model}, heads {m.n_heads}, d_ff {m.d_ff}, {m.n_encoder_layers} encoder + "
            f"{m.n_decoder_layers} decoder layers, source/target lengths {m.max_src_len}/{m.max_tgt_len}, "
            f"vocabularies {m.src_vocab_size}/{m.tgt_vocab_size}, {'tied' if m.tie_embeddings else 'untied'}")


def cmd_info(args):
    from fastformer import __version__, get_backend
    from fastformer.models.config import count_parameters
    from fastformer.training.distributed import get_comm

    comm = get_comm()  # first: under mpiexec it sets the ranks' share of the cores before the kernels load
    if comm.rank:
        return 0
    sizing = any(v is not None for v in (args.preset, args.config, args.data, args.params)) or args.set
    budget = parse_budget(args.params) if args.params else None
    config, vocab_note = info_config(args) if sizing else (None, None)  # bad input fails before any output
    print(f"fastformer {__version__}  python {platform.python_version()}  numpy {np.__version__}")
    if comm.size > 1:
        print(f"mpi: {comm.size} ranks, {comm.local_size} on this node (rank 0's)")
    print(f"backend: {get_backend()}  (FASTFORMER_BACKEND={os.environ.get('FASTFORMER_BACKEND', 'unset')})")
    from fastformer.kernels.threads import thread_info

    for key, value in thread_info().items():
        print(f"{key}: {value}")
    if config is None:
        return 0
    m, name = config.model_config(), args.config or args.preset or "tiny"
    if budget is None:
        n = count_parameters(m)
        print(f"config {name} ({config.kind}): {describe_model(m)}")
        print(f"{n:,} parameters: {format_bytes(4 * n)} of float32 weights, {format_bytes(16 * n)} to train "
              f"(weights, gradients, two AdamW moments; activations extra); {vocab_note}")
        return 0
    names = [item.split("=", 1)[0].strip().split(".", 1) for item in args.set]  # valid: apply_overrides took them
    pinned = {key for section, key in names if section == config.model_section}
    found = configs_in_budget(m, *budget, pinned & {*SIZE_KEYS[config.kind], "n_decoder_layers"})
    print(f"configs of {budget[0]:,}-{budget[1]:,} parameters like {name} ({config.kind}; {vocab_note}):")
    if not found:
        print("  none: widen the range or change the fixed keys")
        return 0
    layers = "layers" if config.kind == "lm" else "enc+dec"
    print(f"  {'d_model':>7} {layers:>7} {'heads':>5} {'d_ff':>6} {'parameters':>12}")
    for n, c in found:
        depth = str(c.n_layers) if config.kind == "lm" else f"{c.n_encoder_layers}+{c.n_decoder_layers}"
        print(f"  {c.d_model:>7} {depth:>7} {c.n_heads:>5} {c.d_ff:>6} {n:>12,}")
    section = config.model_section
    print(f"  train one with --set {section}.d_model=C --set {section}.{SIZE_KEYS[config.kind][1]}=L "
          f"--set {section}.n_heads=H --set {section}.d_ff=F")
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args):
    from fastformer.cli.bench import main

    return main(args)


# ------------------------------------------------------------------------------ plot
def cmd_plot(args):
    from fastformer.cli.plot import main

    return main(args)


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

    def error(self, message):  # one line on stderr and exit status 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--length-penalty", type=float,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("translate", help="decode source texts with an encoder-decoder checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--text", action="append", help="source text (repeatable: one output line each)")
    p.add_argument("--input", help="file of source lines, or - for stdin: one output line per line, written as each "
                                   "batch is done")
    p.add_argument("--batch-size", type=int, default=32, help="sources decoded together (default 32)")
    p.add_argument("--lang", default="en", help="target language of the Moses detokenizer rules (default en; "
                                                "e.g. fr, de)")
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    p.add_argument("--truncate", action="store_true", help="translate a source longer than the model's max_src_len "
                                                           "from its first tokens instead of skipping it")
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
    p.add_argument("--data", help="UTF-8 text file or prepared directory (language model), source<TAB>target "
                                  "file (encoder-decoder); default: the run's own validation data, the windows "
                                  "or pairs the trainer scores")
    p.add_argument("--beam", type=int, help="encoder-decoder: beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, help="encoder-decoder: beam length penalty (default 1.0)")
    p.add_argument("--lang", default="en", help="encoder-decoder: target language of the detokenizer for the "
                                                "standard BLEU (default en)")
    p.add_argument("--examples", type=int, help="encoder-decoder: held-out strings of a synthetic task, or at "
                                                "most this many pairs (default: the trainer's validation set "
                                                "without --data, else all)")
    p.add_argument("--split", choices=("val", "train", "all"),
                   help="val (default), train or all: a text or pairs file is split as training splits it; a "
                        "prepared directory has train and val")
    p.add_argument("--max-batches", type=int, help="language model: at most this many batches (default: the "
                                                   "trainer's train.eval_batches without --data, else all)")
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

    p = sub.add_parser("info", help="show the backend, versions, threads and a config's exact parameter count")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="tiny, small or medium")
    g.add_argument("--config", help="YAML run config")
    p.add_argument("--data", help="data.path: the vocabulary sizes are taken from it as training does")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); with --params a model key set here stays fixed")
    p.add_argument("--params", metavar="LOW-HIGH", help="list model shapes (width, depth, heads, d_ff) whose "
                                                        "parameter count lies in this range, e.g. 2M-3M")
    p.set_defaults(func=cmd_info)

    from fastformer.cli.plot import add_arguments as plot_arguments

    p = sub.add_parser("plot", help="plot metrics of runs against step (loss, val_bpb, lr, ...)")
    plot_arguments(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="time full training steps of a preset model")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--backend", choices=["auto", "numpy", "numba"], default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's batch size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the preset's; longer ones get positions of their own)")
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
        if getattr(args, "out", None) == "":  # every command's --out names a path to write
            raise FastformerError(f"the output of {args.command} (--out) is an empty path: name what to write")
        return args.func(args)
    except (FastformerError, OSError) as e:  # bad input or a file error; anything else is a bug
        message = error_line(e)
        if message is None:
            raise
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
