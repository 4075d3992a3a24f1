"""Qwen3-MoE <-> Hugging Face: a random transformers Qwen3MoeForCausalLM loads into the Megatron MoE model at EP1
and TP2 x EP2 x DP2 (each EP rank takes its own experts), gives transformers' logits to 1e-4 in float32, and the
weight stream and the shared-memory mirror give back every HF tensor (per-expert gate/up/down, router) bit for bit;
the HF folder it writes loads in transformers with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from rntp_megatron.config import build_config
from rntp_megatron.model import hf_mapping
from rntp_megatron.runtime.spawn import run_ranks

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77, 31, 4, 18, 250], [8, 8, 2, 250, 0, 19, 6, 100, 41, 7]])


def moe_card(**parallel):
    return build_config({"model": {"card": "tiny_qwen3_moe", "transformer_impl": "local"},
                         "parallel": parallel, "rl": {"objective": "ntp"}})  # the model only: no rollout engine


def save_random_hf_moe(folder, **model) -> torch.Tensor:
    """A float32 transformers Qwen3MoeForCausalLM of the tiny_qwen3_moe card with random weights (std 0.1, norms
    near 1), saved as an HF folder (per-expert tensors); returns its logits of TOKENS."""
    import transformers

    cfg = build_config({"model": {"card": "tiny_qwen3_moe", **model}}).model
    config = transformers.AutoConfig.for_model(**hf_mapping.hf_config(cfg, torch_dtype="float32"))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
        logits = hf(TOKENS).logits
    hf.save_pretrained(folder)
    return logits


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    return folder, save_random_hf_moe(folder)


def _check(rank: int, world: int, parallel: dict, hf_dir: str, out_dir: str) -> dict:
    from megatron.core import parallel_state

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder, load_hf_weights, save_hf_checkpoint
    from rntp_megatron.weights.shared_mirror import shared_mirror

    cfg = moe_card(**parallel)
    init_distributed(cfg.parallel, seed=7)
    try:
        hf = SafetensorsFolder(hf_dir)
        model = build_model(cfg.model, cfg.parallel).eval()
        load_hf_weights(model, hf, cfg.model)
        local_experts = sum(1 for n, _ in model.named_parameters() if n.endswith("linear_fc2.weight") and "expert" in n)
        with torch.no_grad():
            logits = model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(parts, logits.contiguous(),
                                             group=parallel_state.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)
        report = {"logits": logits[..., :cfg.model.vocab_size], "local_experts": local_experts}
        stream = stream_hf_weights(model, cfg.model, bucket_bytes=16 * 1024)
        if rank == 0:
            exported = {name: t.clone() for bucket in stream for name, t in bucket}
            report["names_equal"] = sorted(exported) == sorted(hf)
            report["bit_exact"] = all(torch.equal(exported[k], hf[k]) for k in hf)
            save_hf_checkpoint(stream_hf_weights(model, cfg.model, bucket_bytes=16 * 1024), out_dir, cfg.model)
        else:
            for _ in stream:
                pass
            for _ in stream_hf_weights(model, cfg.model, bucket_bytes=16 * 1024):
                pass
        # the shared-memory mirror: each EP rank writes its own experts in place, nothing is gathered
        mirror = shared_mirror(model, cfg.model, bucket_bytes=16 * 1024)
        mirrored = {name: t.clone() for bucket in (mirror.stream() if mirror else ()) for name, t in bucket}
        if rank == 0:
            report["mirror_bit_exact"] = (sorted(mirrored) == sorted(hf)
                                          and all(torch.equal(mirrored[k], hf[k]) for k in hf))
        return report
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("world,parallel", [
    (1, {}),
    (4, {"expert_model_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True}),
], ids=["ep1", "tp2_ep2"])
def test_moe_logits_match_transformers_and_export_round_trips(hf_reference, tmp_path, world, parallel):
    import transformers

    hf_dir, hf_logits = hf_reference
    out = tmp_path / "exported"
    reports = run_ranks(_check, world, (parallel, str(hf_dir), str(out)))
    ep = parallel.get("expert_model_parallel_size", 1)
    for r in reports:
        assert r["local_experts"] == 2 * 8 // ep  # 2 layers, 8 experts over EP ranks: none holds all at EP2
        err = (r["logits"] - hf_logits).abs().max().item()
        assert err < 1e-4, f"{parallel}: logits differ from transformers' by {err:.2e}"
    assert reports[0]["names_equal"] and reports[0]["bit_exact"], reports[0]
    assert reports[0]["mirror_bit_exact"], "the shared-memory mirror's HF tensors differ from the HF folder's"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, hf_logits, atol=0, rtol=0)
