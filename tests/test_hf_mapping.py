"""model/hf_mapping + weights/ (export, HF checkpoints): Megatron <-> HF names, layouts and configs.

Reference: a Hugging Face transformers model built from the generated config.json. Its weights are loaded into
the Megatron model (TP1, TP2, PP2), the Megatron logits must match HF's in float32, and the weights streamed
back out of the sharded model must equal the HF tensors bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from rntp_megatron.config import build_config
from rntp_megatron.model import hf_mapping
from rntp_megatron.weights.buckets import bucketed, flatten, nbytes, unflatten
from rntp_megatron.runtime.spawn import run_ranks

FAMILIES = ("tiny", "tiny_qwen2", "tiny_qwen3")


def card(name: str, **model):
    return build_config({"model": {"card": name, "transformer_impl": "local", **model}}).model


def hf_model(cfg, seed: int = 0):
    """A float32 HF transformers model for the card, random weights (std 0.1 so every tensor matters)."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_mapping.hf_config(cfg, torch_dtype="float32"))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def test_qkv_layout_round_trip_with_gqa():
    cfg = card("tiny_qwen3")  # 4 heads, 2 groups, head_dim 32 != hidden/heads
    d, rows = 32, 2 * (2 + 2) * 32
    qkv = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    (qn, q), (kn, k), (vn, v) = hf_mapping.to_hf("decoder.layers.1.self_attention.linear_qkv.weight", qkv, cfg)
    assert (qn, kn, vn) == tuple(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    # group 0 holds q heads 0,1 then k0 then v0; group 1 holds q heads 2,3, k1, v1
    assert torch.equal(q[:2 * d], qkv[:2 * d]) and torch.equal(k[:d], qkv[2 * d:3 * d])
    assert torch.equal(v[:d], qkv[3 * d:4 * d]) and torch.equal(q[2 * d:], qkv[4 * d:6 * d])
    hf = {qn: q, kn: k, vn: v}
    assert torch.equal(hf_mapping.from_hf("decoder.layers.1.self_attention.linear_qkv.weight", hf, cfg, 256), qkv)
    with pytest.raises(hf_mapping.MappingError, match="expected groups"):
        hf_mapping.to_hf("decoder.layers.0.self_attention.linear_qkv.weight", qkv[:-1], cfg)


def test_fc1_tp_shards_hold_gate_and_up_halves():
    full = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2)  # gate rows 0..3, up rows 4..7
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    shards = [hf_mapping.split_tp_shard(name, full, 2, r) for r in range(2)]
    assert torch.equal(shards[0], full[[0, 1, 4, 5]]) and torch.equal(shards[1], full[[2, 3, 6, 7]])
    assert torch.equal(hf_mapping.merge_tp_shards(name, shards), full)
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    assert torch.equal(hf_mapping.merge_tp_shards(proj, [full[:, :1], full[:, 1:]]), full)
    assert hf_mapping.tp_partition_dim("decoder.layers.0.input_layernorm.weight") is None


def test_vocab_padding_and_tied_output():
    cfg = card("tiny_qwen2", vocab_size=200)
    emb = torch.randn(256, 64)
    [(name, t)] = hf_mapping.to_hf("module.module.embedding.word_embeddings.weight", emb, cfg)
    assert name == "model.embed_tokens.weight" and torch.equal(t, emb[:200])
    assert hf_mapping.to_hf("output_layer.weight", emb, cfg) == []  # tied: no lm_head
    back = hf_mapping.from_hf("output_layer.weight", {name: t}, cfg, 256)
    assert torch.equal(back[:200], emb[:200]) and not back[200:].any()
    with pytest.raises(hf_mapping.MappingError, match="decoder.layers.0.mystery"):
        hf_mapping.to_hf("decoder.layers.0.mystery.weight", emb, cfg)
    with pytest.raises(hf_mapping.MappingError, match="lack 'model.norm.weight'"):
        hf_mapping.from_hf("decoder.final_layernorm.weight", {}, cfg, 256)


@pytest.mark.parametrize("name", FAMILIES + ("qwen3_8b", "llama3_1_70b"))
def test_hf_config_round_trip(name):
    cfg = card(name)
    hf = hf_mapping.hf_config(cfg)
    assert hf["architectures"] == [hf_mapping.ARCHITECTURES[cfg.family]]
    back = build_config({"model": {**hf_mapping.model_fields_from_hf(json.loads(json.dumps(hf))),
                                   "transformer_impl": "local"}}).model
    for field in ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size", "rotary_base", "rope_scaling_factor", "norm_epsilon",
                  "qkv_bias", "qk_layernorm", "tie_word_embeddings", "params_dtype"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert hf_mapping.head_dim(back) == hf_mapping.head_dim(cfg)


def test_hf_config_rejects_unmappable_cards():
    with pytest.raises(hf_mapping.MappingError, match="kv_channels=32"):
        hf_mapping.hf_config(card("tiny_qwen2", kv_channels=32))
    with pytest.raises(hf_mapping.MappingError, match="MistralForCausalLM"):
        hf_mapping.model_fields_from_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


def test_buckets_are_bounded_and_flatten_round_trips():
    named = [("a", torch.randn(10)), ("b", torch.randn(3, 4).bfloat16()), ("c", torch.randn(100)),
             ("d", torch.arange(5, dtype=torch.int64))]
    buckets = list(bucketed(named, 64))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]  # c (400 B) travels alone
    assert all(sum(nbytes(t) for _, t in b) <= 64 for b in buckets if len(b) > 1)
    flat, metas = flatten(named)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(nbytes(t) for _, t in named)
    for (n0, t0), (n1, t1) in zip(named, unflatten(flat, metas)):
        assert n0 == n1 and t0.dtype == t1.dtype and torch.equal(t0, t1)


# ---------------------------------------------------------------------------------------------------
# Sharded models on gloo ranks.


def _check_families(rank: int, world_size: int, tp: int, pp: int, out_dir: str) -> dict:
    from megatron.core import parallel_state

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import gather_hf_state_dict, stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder, load_hf_weights, save_hf_checkpoint

    parallel = build_config({"parallel": {"tensor_model_parallel_size": tp,
                                          "pipeline_model_parallel_size": pp}}).parallel
    init_distributed(parallel, seed=7)
    report = {}
    try:
        tokens = torch.tensor([[1, 5, 9, 200, 3, 77, 31, 4], [8, 8, 2, 250, 0, 19, 6, 100]])
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        for name in FAMILIES:
            cfg = card(name)
            ref = hf_model(cfg)
            ref_state = dict(ref.state_dict())
            if cfg.tie_word_embeddings:
                ref_state.pop("lm_head.weight", None)
            model = build_model(cfg, parallel).eval()
            load_hf_weights(model, ref_state, cfg)
            if pp == 1:  # the forward needs no pipeline schedule: compare logits with HF
                with torch.no_grad():
                    logits = model(tokens, positions, None)
                    if tp > 1:
                        parts = [torch.empty_like(logits) for _ in range(tp)]
                        torch.distributed.all_gather(parts, logits.contiguous(),
                                                     group=parallel_state.get_tensor_model_parallel_group())
                        logits = torch.cat(parts, dim=-1)
                    hf_logits = ref(tokens).logits
                report[f"{name}_logit_err"] = (logits[..., :cfg.vocab_size] - hf_logits).abs().max().item()
            exported = gather_hf_state_dict(model, cfg)
            sizes = [sum(nbytes(t) for _, t in b) for b in stream_hf_weights(model, cfg, bucket_bytes=64 * 1024)]
            if rank == 0:
                assert sorted(exported) == sorted(ref_state), (list(exported), list(ref_state))
                report[f"{name}_equal"] = all(torch.equal(exported[k], ref_state[k]) for k in ref_state)
                report[f"{name}_buckets"] = len(sizes)
                report[f"{name}_bucket_ok"] = all(s <= 64 * 1024 for s in sizes)
                written = save_hf_checkpoint(stream_hf_weights(model, cfg, bucket_bytes=64 * 1024),
                                             f"{out_dir}/{name}", cfg)
                back = SafetensorsFolder(written)
                report[f"{name}_saved_equal"] = set(back) == set(ref_state) and all(
                    torch.equal(back[k], ref_state[k]) for k in ref_state)
            else:
                assert exported == {} and sizes == []
                list(stream_hf_weights(model, cfg, bucket_bytes=64 * 1024))
    finally:
        destroy_distributed()
    return report


@pytest.mark.distributed
def test_tp1_logits_match_hf_and_export_round_trips(tmp_path):
    [report] = run_ranks(_check_families, 1, (1, 1, str(tmp_path)))
    for name in FAMILIES:
        assert report[f"{name}_logit_err"] < 1e-4, report
        assert report[f"{name}_equal"] and report[f"{name}_saved_equal"] and report[f"{name}_bucket_ok"], report
        assert report[f"{name}_buckets"] > 1, report


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_export_gathers_full_hf_tensors(tmp_path, tp, pp):
    reports = run_ranks(_check_families, tp * pp, (tp, pp, str(tmp_path)))
    for name in FAMILIES:
        assert reports[0][f"{name}_equal"] and reports[0][f"{name}_saved_equal"], reports[0]
        assert reports[0][f"{name}_bucket_ok"], reports[0]
        if pp == 1:
            assert all(r[f"{name}_logit_err"] < 1e-4 for r in reports), reports


def test_save_hf_checkpoint_is_atomic_and_loads_in_transformers(tmp_path):
    import transformers

    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    cfg = card("tiny_qwen2")
    ref = hf_model(cfg)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    out = save_hf_checkpoint(bucketed(state.items(), 32 * 1024), tmp_path / "ckpt", cfg)
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(loaded(tokens).logits, ref(tokens).logits, atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(bucketed(state.items(), 1 << 20), out, cfg)

    def failing():
        yield list(state.items())[:2]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf_checkpoint(failing(), out, cfg, overwrite=True)
    assert (out / "model.safetensors.index.json").exists()  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind


@pytest.mark.parametrize("family,tp", [("tiny", 2), ("tiny_qwen2", 2), ("tiny_qwen3", 2), ("tiny_qwen2", 1)])
def test_shard_pieces_tile_the_hf_tensors(family, tp):
    """Each TP shard written in place through shard_to_hf rebuilds exactly to_hf of the merged tensor."""
    cfg = card(family, vocab_size=250)  # not a multiple of the padded vocab: the last shard is trimmed
    torch.manual_seed(0)
    for name in hf_mapping.megatron_names(cfg, fused_norms=False) + ["output_layer.weight"]:
        full = _random_full(name, cfg, padded_vocab=256)
        expected = dict(hf_mapping.to_hf(name, full, cfg))
        built = {n: torch.full_like(t, float("nan")) for n, t in expected.items()}
        for rank in range(tp):
            shard = hf_mapping.split_tp_shard(name, full, tp, rank)
            for piece in hf_mapping.shard_to_hf(name, shard, cfg, tp, rank):
                target = built[piece.name] if piece.dim is None else built[piece.name].narrow(
                    piece.dim, piece.start, piece.piece.shape[piece.dim])
                assert not torch.isnan(target).logical_not().any(), f"{piece.name} written twice"
                target.copy_(piece.piece)
        for n, t in expected.items():
            assert torch.equal(built[n], t), f"{name} -> {n} differs at TP={tp}"


def _random_full(name: str, cfg, padded_vocab: int) -> torch.Tensor:
    """A random full megatron tensor of the parameter's shape (vocab params padded to padded_vocab rows)."""
    h, d = cfg.hidden_size, hf_mapping.head_dim(cfg)
    qkv_rows = cfg.num_query_groups * (cfg.num_attention_heads // cfg.num_query_groups + 2) * d
    shapes = {"word_embeddings.weight": (padded_vocab, h), "output_layer.weight": (padded_vocab, h),
              "linear_qkv.weight": (qkv_rows, h), "linear_qkv.bias": (qkv_rows,),
              "linear_proj.weight": (h, cfg.num_attention_heads * d),
              "linear_fc1.weight": (2 * cfg.ffn_hidden_size, h), "linear_fc2.weight": (h, cfg.ffn_hidden_size),
              "q_layernorm.weight": (d,), "k_layernorm.weight": (d,)}
    shape = next((s for suffix, s in shapes.items() if name.endswith(suffix)), (h,))
    return torch.randn(shape)
