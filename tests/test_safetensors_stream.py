import pytest
import torch
from safetensors.torch import load_file, save_file

from forge.safetensors_stream import StreamWriter, iter_tensors


def test_tensors_written_one_by_one_read_back_with_the_safetensors_library(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5, dtype=torch.bfloat16), "a.bias": torch.arange(7, dtype=torch.int64),
               "c.scale": torch.randn(2, dtype=torch.float32)}
    layout = [(k, str(v.dtype)[6:], list(v.shape)) for k, v in tensors.items()]
    writer = StreamWriter(tmp_path / "x.safetensors", layout,
                          {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_reading_matches_the_library_and_writing_checks_order_and_shape(tmp_path):
    ref = {"w": torch.randn(4, 4), "v": torch.randn(3).to(torch.float16)}
    save_file(ref, str(tmp_path / "ref.safetensors"))
    assert {k: v for k, v in iter_tensors(tmp_path / "ref.safetensors")}.keys() == ref.keys()
    assert all(torch.equal(t, ref[k]) for k, t in iter_tensors(tmp_path / "ref.safetensors"))
    writer = StreamWriter(tmp_path / "y.safetensors", [("w", "float32", [4, 4]), ("v", "float16", [3])])
    with pytest.raises(ValueError, match="expected tensor 'w' next"):
        writer.write("v", ref["v"])
    with pytest.raises(ValueError, match="expected F32"):
        writer.write("w", ref["w"].double())
    with pytest.raises(ValueError, match="only 0 of 2"):
        writer.close()
