"""models.hf.is_hf_dir: the one test of "is this a Hugging Face directory" that generate, eval,
export and --init-from share."""

from fastformer import LMConfig, TransformerLM
from fastformer.models.hf import is_hf_dir, save_hf


def test_is_hf_dir(tmp_path):
    hf = tmp_path / "hf"
    save_hf(TransformerLM(LMConfig(d_model=8, n_heads=2, d_ff=8, n_layers=1)), str(hf))
    assert is_hf_dir(str(hf))
    assert not is_hf_dir(str(tmp_path))  # no config.json
    (hf / "state.json").write_text("{}")  # a fastformer checkpoint's state.json decides
    assert not is_hf_dir(str(hf))
    assert not is_hf_dir(str(tmp_path / "missing"))
