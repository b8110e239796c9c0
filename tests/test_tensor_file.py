"""The safetensors writer (fastclr.tensor_file) against the safetensors package's own reader and writer."""

from __future__ import annotations

import io
import json

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from fastclr.tensor_file import safetensors_writer


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7),
            "half": torch.randn(5, generator=g).bfloat16(), "f16": torch.randn(3, generator=g).half(),
            "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "ids": torch.arange(5, dtype=torch.int32),
            "byte": torch.arange(3, dtype=torch.uint8), "t": torch.randn(3, 2, generator=g).t(), "d": torch.randn(2).double()}


def test_the_file_reads_back_through_safetensors_as_its_own_writer_s_does(tmp_path: object) -> None:
    """Every tensor (dtypes of 1 to 8 bytes, 0-d, empty, a transposed view) and the metadata read back
    through safetensors equal to the originals and to what safetensors.torch.save's bytes give; each
    tensor starts aligned to its element size, and the header ends 8-byte aligned."""
    state, meta = tensors(), {"fastclr": json.dumps({"encoder": "cnn"}), "naming": "torchvision"}
    f = io.BytesIO()
    safetensors_writer(state, meta)(f)
    data = f.getvalue()
    ours, theirs = load(data), load(save({k: v.contiguous() for k, v in state.items()}, metadata=meta))
    assert set(ours) == set(state) == set(theirs)
    for k, v in state.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
        assert torch.equal(ours[k], theirs[k]), k
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(data[8:8 + n])
    assert header.pop("__metadata__") == meta
    for k, entry in header.items():
        assert (8 + n + entry["data_offsets"][0]) % state[k].element_size() == 0, k
    assert sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) == len(data) - 8 - n
    path = tmp_path / "x.safetensors"  # type: ignore[operator]
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as st:
        assert st.metadata() == meta and torch.equal(st.get_tensor("conv.weight"), state["conv.weight"])
