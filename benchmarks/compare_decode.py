"""fastformer's decoding in each weight format against transformers' `generate` and CTranslate2.

Batch 1, greedy, 128 new tokens after a 16-token prompt (fastformer.cli.bench's generation
benchmark: a randomly initialised preset model, vocabulary 4096) by fastformer with fp32, bf16
and int8 weights (model.quantize), transformers' GPT2LMHeadModel.generate (float32) and
CTranslate2's Generator in float32 and int8. The rivals run fastformer's own Hugging Face export
(fastformer.training.export.export_hf, what `fastformer export` writes; a character tokenizer whose
4092 characters stand for the ids), which CTranslate2 converts with its TransformersConverter.
Before anything is timed, the prompt's logits of transformers are checked against fastformer's, and
each contender's greedy tokens are compared with fastformer's fp32 tokens (reported: CTranslate2
float32 should make the same tokens).

With --sampled N (several Ns allowed), N sequences of the one prompt sampled side by side (temperature
1, top-k 50; N = 1, a batch-1 sampled generation) by fastformer in each format against
generate(do_sample=True, num_return_sequences=N).

Every contender runs in its own process (benchmarks/decode_contenders.py for the rivals, which never
import fastformer; fastformer's never imports torch), builds and warms up first, then they take
turns for --rounds rounds, each turn after a pause of PAUSE seconds (a rival's threads may spin that
long after its calls); each figure is the rate of the median call. A call right after an idle pause
runs slower on this kind of machine, the more the shorter it is (docs/benchmarks.md), so --warm W
makes W untimed calls at the start of each turn: the timed one then runs as the calls of a
sustained decoder do. A rival whose library is not installed is left out with a line saying so.

    python benchmarks/compare_decode.py                                  # tiny, small, medium
    python benchmarks/compare_decode.py --presets medium --sampled 1 16
    python benchmarks/compare_decode.py --presets medium --warm 1        # each turn's call warm
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("fp32", "bf16", "int8")
RIVALS = {"transformers": ("torch", "transformers"), "ctranslate2 fp32": ("ctranslate2", "transformers", "torch"),
          "ctranslate2 int8": ("ctranslate2", "transformers", "torch")}  # contender -> modules it needs
PAUSE = 0.2  # seconds between two contenders' turns


# --- fastformer's side: one weight format, in its own process ---

def fastformer_call(fmt, preset, rows, sampled):
    """(generate function, {"tokens": its first row's new ids}), warmed up, on the current backend:
    greedy, or `rows` copies of the prompt sampled side by side."""
    from fastformer.cli import bench

    model = bench.generation_model(preset).quantize(fmt)
    prompt = np.repeat(bench.generation_prompt(model.config), rows, axis=0)  # (rows, P)
    options = dict(temperature=1.0, top_k=bench.GEN_TOP_K, seed=0) if sampled else dict(temperature=0.0)

    def fn():
        return model.generate(prompt, bench.GEN_NEW, **options)

    return fn, {"tokens": fn()[0, prompt.shape[1]:].tolist()}


def worker(fmt, preset, threads, rows, sampled):
    from torch_contenders import serve

    import fastformer
    from fastformer.kernels.process import apply_process_settings

    fastformer.set_backend("numba")
    apply_process_settings(threads)
    serve(lambda: fastformer_call(fmt, preset, rows, sampled))


# --- the parent ---

def write_inputs(preset, inputs, rows, sampled):
    """fastformer's export of the preset's generation model, its prompt and logits, the spec."""
    from fastformer.cli import bench
    from fastformer.data.tokenizer import CharTokenizer
    from fastformer.training.export import export_hf

    model = bench.generation_model(preset)
    V = model.config.vocab_size
    tokenizer = CharTokenizer([chr(0x4E00 + i) for i in range(V - len(CharTokenizer.special_tokens))])
    assert tokenizer.vocab_size == V
    export_hf(model, tokenizer, os.path.join(inputs, "hf"))
    prompt = bench.generation_prompt(model.config)  # (1, P)
    np.save(os.path.join(inputs, "prompt.npy"), prompt)
    np.save(os.path.join(inputs, "logits.npy"), model.forward(prompt[0]))
    with open(os.path.join(inputs, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(dict(new_tokens=bench.GEN_NEW, rows=rows, sampled=sampled, top_k=bench.GEN_TOP_K), f)


def available(name):
    """The rival `name` can run: the modules it needs are installed."""
    return all(importlib.util.find_spec(m) is not None for m in RIVALS[name])


def compare(preset, rows, sampled, rounds, threads, rivals, rival_threads, warm=0):
    """({contender: tokens/s (all rows)}, {contender: its ready answer}); `warm` untimed calls
    start each turn."""
    from torch_contenders import Worker

    from fastformer.cli import bench

    names = [f"fastformer {fmt}" for fmt in FORMATS] + rivals
    with tempfile.TemporaryDirectory() as inputs:
        write_inputs(preset, inputs, rows, sampled)
        if any(n.startswith("ctranslate2") for n in names):
            subprocess.run([sys.executable, os.path.join(HERE, "decode_contenders.py"), "convert", inputs],
                           check=True, capture_output=True)
        started = []
        for name in names:
            if name.startswith("fastformer"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name.split()[1], preset, str(threads),
                       str(rows), str(int(sampled))]
            else:
                cmd = [sys.executable, os.path.join(HERE, "decode_contenders.py"), name, str(rival_threads), inputs]
            started.append(Worker(name, cmd))
        ready, times = {}, {}
        try:
            for c in started:  # they build and warm up side by side; nothing is timed yet
                r = c.answer()
                if "error" in r:
                    raise SystemExit(f"{preset}: {c.name} failed: {r['error']}")
                ready[c.name], times[c.name] = r["ready"], []
            for _ in range(rounds):
                for c in started:
                    time.sleep(PAUSE)
                    times[c.name] += c.times(warm + 1)["times"][warm:]
        finally:
            for c in started:
                c.close()
    return {n: rows * bench.GEN_NEW / float(np.median(t)) for n, t in times.items()}, ready


def leading(a, b):
    """The number of leading ids two id lists share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_table(presets, rows, sampled, rounds, threads, rivals, rival_threads, warm=0):
    how = (f"{'batch 1' if rows == 1 else f'{rows} sequences of one prompt'}, sampled (temperature 1, top-k 50)"
           if sampled else "batch 1, greedy")
    print(f"decoding tokens/s, {how}, 128 new tokens after 16; median of {rounds} rounds taking turns"
          + (f", each turn's call after {warm} untimed" if warm else ", each call after a pause")
          + f"; fastformer on {threads} threads, " + (f"the rivals on {rival_threads}" if rivals else "no rival"))
    names = [f"fastformer {fmt}" for fmt in FORMATS] + rivals
    short = {n: n.replace("fastformer ", "").replace("ctranslate2 ", "ct2 ").replace("transformers", "hf")
             for n in names}
    print(f"{'preset':8s} " + " ".join(f"{short[n]:>9s}" for n in names)
          + "".join(f" {'int8/' + short[n]:>12s}" for n in names if not n.startswith("fastformer"))
          + f" {'int8/fp32':>10s} {'bf16/fp32':>10s}")
    checks = []
    for preset in presets:
        r, ready = compare(preset, rows, sampled, rounds, threads, rivals, rival_threads, warm)
        line = f"{preset:8s} " + " ".join(f"{r[n]:9.0f}" for n in names)
        line += "".join(f" {r['fastformer int8'] / r[n]:11.2f}x" for n in names if not n.startswith("fastformer"))
        fp32 = r["fastformer fp32"]
        line += f" {r['fastformer int8'] / fp32:9.2f}x {r['fastformer bf16'] / fp32:9.2f}x"
        print(line, flush=True)
        ref = ready["fastformer fp32"]["tokens"]
        if "transformers" in ready:
            checks.append(f"{preset}: transformers' prompt logits differ from fastformer's by at most "
                          f"{ready['transformers']['logits_diff']:.1e}")
        if not sampled:
            for n in names[1:]:
                k = leading(ref, ready[n]["tokens"])
                checks.append(f"{preset}: {n} greedy tokens: " + ("identical to fastformer fp32's" if k == len(ref)
                              else f"the first {k} of {len(ref)} equal to fastformer fp32's"))
    for line in checks:
        print("  " + line)
    return checks


def main(argv=None):
    if argv is None and len(sys.argv) == 7 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), bool(int(sys.argv[6])))
    from fastformer.kernels.ops.quantized import format_runs_natively
    from fastformer.kernels.process import num_threads
    from fastformer.training.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(PRESETS))
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--sampled", type=int, nargs="+", default=[],
                    help="also N sampled sequences of one prompt, for each N given (1: batch 1; e.g. 1 16)")
    ap.add_argument("--rivals", nargs="*", default=list(RIVALS), choices=list(RIVALS),
                    help="rivals to run (default: every installed one)")
    ap.add_argument("--threads", type=int, default=None, help="threads of every contender (default: the cores)")
    ap.add_argument("--rival-threads", type=int, default=None,
                    help="threads of the rivals alone (default: --threads), e.g. a rival's fastest count here")
    ap.add_argument("--warm", type=int, default=0,
                    help="untimed calls at the start of each turn, after the pause (default 0)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warm < 0:
        ap.error("--rounds must be at least 1 and --warm at least 0")
    missing = [f for f in FORMATS if not format_runs_natively(f)]
    if missing:
        raise SystemExit(f"compare_decode: this CPU does not run {', '.join(missing)} weights natively")
    rivals = [n for n in args.rivals if available(n)]
    for n in args.rivals:
        if n not in rivals:
            print(f"{n}: left out, not installed (pip install {' '.join(RIVALS[n])})")
    threads = args.threads or num_threads()
    rival_threads = args.rival_threads or threads
    print_table(args.presets, 1, False, args.rounds, threads, rivals, rival_threads, args.warm)
    for n in args.sampled:
        print()
        print_table(args.presets, n, True, args.rounds, threads, [r for r in rivals if r == "transformers"],
                    rival_threads, args.warm)


if __name__ == "__main__":
    main()
