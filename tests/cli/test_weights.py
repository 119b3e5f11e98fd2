"""--weights fp32|bf16|int8 on generate and eval (translate: test_translate.py), and what `info`
says of the CPU's instruction sets and the formats that run natively."""

import json

import pytest

from fastformer import use_backend
from fastformer.cli import main
from fastformer.kernels.ops import quantized as Q

TINY_YAML = """\
model: {max_seq_len: 32, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 1}
train: {batch_size: 4, seq_len: 32, max_steps: 3, warmup_steps: 1, eval_interval: 3, eval_batches: 1,
        checkpoint_interval: 3}
"""
NATIVE = [f for f in Q.FORMATS if Q.format_runs_natively(f)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    (d / "data.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    (d / "tiny.yaml").write_text(TINY_YAML)
    with use_backend("numpy"):
        assert main(["train", "--config", str(d / "tiny.yaml"), "--data", str(d / "data.txt"), "--out", str(d / "run"),
                     "--seed", "3"]) == 0
    return str(d / "run")


@pytest.mark.parametrize("weights", NATIVE)
def test_generate_and_eval_in_each_format(run, weights, capsys):
    capsys.readouterr()
    with use_backend("numpy"):
        assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--max-new-tokens", "10",
                     "--temperature", "0", "--weights", weights, "--backend", "numba"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("To be") and len(out) > len("To be\n")
        assert main(["eval", "--checkpoint", run, "--json", "--weights", weights, "--backend", "numba"]) == 0
        m = json.loads(capsys.readouterr().out)
        assert main(["eval", "--checkpoint", run, "--json", "--backend", "numba"]) == 0
        fp32 = json.loads(capsys.readouterr().out)
    assert m["weights"] == weights and fp32["weights"] == "fp32"
    assert abs(m["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]
    assert (m["loss"] == fp32["loss"]) == (weights == "fp32")


def test_unknown_and_unavailable_formats_are_one_line(run, capsys, monkeypatch):
    with use_backend("numpy"):
        assert main(["generate", "--checkpoint", run, "--prompt", "To", "--weights", "int4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown weight format 'int4': valid values are fp32, bf16, int8" in err
        pytest.importorskip("numba")
        monkeypatch.setattr(Q, "cpu_has_vnni", lambda: False)  # as on a CPU without AVX-512 VNNI
        assert main(["eval", "--checkpoint", run, "--weights", "int8", "--backend", "numba"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "weight format int8 needs a CPU with AVX-512 VNNI (the avx512_vnni flag" in err


def test_info_names_the_instruction_sets_and_native_formats(capsys, monkeypatch):
    from fastformer.kernels import process

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"weight_formats: {', '.join(NATIVE)} run natively" in out
    monkeypatch.setattr(process, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(process, "cpu_has_bf16", lambda: False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu_instruction_sets: neither avx512_bf16 nor avx512_vnni" in out
    assert "weight_formats: fp32 run natively (--weights; the numba backend); the others only on the numpy" in out
