"""The GGUF writer encodes a tensor a block of rows at a time: the bytes must be those
of encoding the whole tensor at once, for every type the converter writes."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from huatuo_lite.convert.gguf.stream import Q, encode, row_blocks  # noqa: E402


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0])
@pytest.mark.parametrize("shape", [(37, 64), (5, 3, 96), (128,)])
def test_row_blocks_encode_to_the_whole_tensors_bytes(qtype, shape):
    generator = torch.Generator().manual_seed(0)
    tensor = (torch.randn(*shape, generator=generator) * 3).to(torch.bfloat16)
    whole = encode(tensor.float().numpy(), qtype).tobytes()
    # 1 KB blocks: several rows per block, and a short last block (37 rows -> 4 + ... + 1)
    blocks = list(row_blocks(tensor, block_bytes=1024))
    assert len(blocks) > 1 or len(shape) == 1
    assert all(b.dtype == np.float32 and b.shape[-1] == shape[-1] for b in blocks)
    assert b"".join(encode(b, qtype).tobytes() for b in blocks) == whole


def test_row_blocks_keep_whole_rows_when_a_row_exceeds_the_block():
    tensor = torch.arange(4 * 512, dtype=torch.float32).reshape(4, 512)
    blocks = list(row_blocks(tensor, block_bytes=16))        # one 2 KB row > 16 B: a row per block
    assert [b.shape for b in blocks] == [(1, 512)] * 4
    np.testing.assert_array_equal(np.concatenate(blocks), tensor.numpy())
