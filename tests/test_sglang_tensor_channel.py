"""rollout/sglang/tensor_channel payloads: the path chosen by the tensors' device, and a CPU bucket that
SGLang's own deserializer (the one its scheduler runs, in the server's virtualenv) reads back exactly.
The CUDA IPC path needs a GPU and is not run here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from rntp_megatron.rollout.sglang.tensor_channel import sharing_path, tensor_payloads
from rntp_megatron.rollout.sglang.process import server_env
from rntp_megatron.weights.fp8 import fp8_buckets

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = Path(os.environ.get("RNTP_SGLANG_PYTHON", ROOT / "sglang-venv" / "bin" / "python"))


def _bucket():
    torch.manual_seed(0)
    [bucket] = fp8_buckets([[("model.layers.0.mlp.up_proj.weight", torch.randn(128, 64, dtype=torch.bfloat16)),
                             ("model.norm.weight", torch.rand(64, dtype=torch.bfloat16))]])
    return bucket


def test_sharing_path_follows_the_device():
    assert sharing_path(_bucket()) == "shared_memory"
    assert sharing_path([]) == "shared_memory"
    with pytest.raises(ValueError, match="'meta' cannot be shared"):
        sharing_path([("w", torch.empty(2, device="meta"))])
    with pytest.raises(ValueError, match=r"mixes devices \['cpu', 'meta'\]"):
        sharing_path([("a", torch.ones(2)), ("w", torch.empty(2, device="meta"))])


READER = """
import json, sys
from safetensors.torch import save_file
from sglang.srt.utils.common import MultiprocessingSerializer
from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
monkey_patch_torch_reductions()  # as the scheduler's deserialize_own_rank does
for rank, payload in enumerate(json.load(open(sys.argv[1]))):
    tensors = MultiprocessingSerializer.deserialize(payload)
    save_file({name: t.contiguous() for name, t in tensors}, f"{sys.argv[2]}.{rank}")
    print(rank, [(name, str(t.dtype)) for name, t in tensors])
"""


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason=f"SGLang server virtualenv missing ({SGLANG_PYTHON})")
def test_cpu_payloads_round_trip_through_sglangs_deserializer(tmp_path):
    from safetensors.torch import load_file

    bucket = _bucket()
    assert [n for n, _ in bucket] == ["model.layers.0.mlp.up_proj.weight",
                                      "model.layers.0.mlp.up_proj.weight_scale_inv", "model.norm.weight"]
    payloads = tensor_payloads(bucket, ranks=2)  # one per server TP rank
    assert len(payloads) == 2
    (tmp_path / "payloads.json").write_text(json.dumps(payloads))
    (tmp_path / "reader.py").write_text(READER)
    done = subprocess.run([str(SGLANG_PYTHON), "reader.py", "payloads.json", "out"], cwd=tmp_path,
                          env=server_env(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        got = load_file(tmp_path / f"out.{rank}")
        assert set(got) == {n for n, _ in bucket}
        for name, want in bucket:
            assert got[name].dtype == want.dtype and torch.equal(got[name].view(torch.uint8),
                                                                 want.contiguous().view(torch.uint8))


def test_fp8_bucket_is_one_buffer_so_one_handle_per_rank():
    bucket = _bucket()
    assert len({t.untyped_storage().data_ptr() for _, t in bucket}) == 1
    assert [t.dtype for _, t in bucket] == [torch.float8_e4m3fn, torch.float32, torch.bfloat16]
