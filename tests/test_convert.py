"""`rntp convert`: Megatron dist checkpoints <-> Hugging Face folders.

- A checkpoint saved at TP2 (and one at PP2) is exported by one process (dist_checkpointing reshards); the
  folder loads in transformers and its float32 logits match the Megatron model that saved it.
- An HF folder (llama, qwen2 with tied embeddings, qwen3) imported at TP2 and exported again is bit-exact.
- `--fp8` writes blockwise FP8 linear weights + weight_scale_inv within e4m3 rounding of the plain export, the rest
  identical, with the quantization_config that transformers reads (on CPU it dequantizes).
- Missing or corrupt checkpoints, unsupported architectures and layouts that do not fit fail with errors that
  say so, and leave no output folder behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rntp_megatron.config import ConfigError
from rntp_megatron.runtime.spawn import run_ranks

FAMILIES = ("tiny", "tiny_qwen2", "tiny_qwen3")
TOKENS = [[1, 5, 9, 200, 3, 77, 31, 4], [8, 8, 2, 250, 0, 19, 6, 100]]


def _save_random_checkpoint(rank: int, world_size: int, card: str | dict, tp: int, pp: int, root: str) -> list:
    """Rank's part of a random-init model (a card, or model fields) saved at TP x PP; returns the full float32
    logits (last stage, TP rank 0)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    model_fields = {"card": card} if isinstance(card, str) else card
    cfg = build_config({"model": {**model_fields, "transformer_impl": "local", "init_method_std": 0.2},
                        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}})
    init_distributed(cfg.parallel, seed=11)
    try:
        model = build_model(cfg.model, cfg.parallel).eval()
        model_fields = {k: v for k, v in vars(cfg.model).items() if k != "card"}
        save_checkpoint(root, 3, [model], None, trainer_state={"step": 3, "model": model_fields}, rank_state={})
        tokens = torch.tensor(TOKENS)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        outputs = []

        def forward_step(_, m):
            return m(tokens, positions, None), lambda out: (out.sum(), {"logits": out})

        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            logits = losses[0]["logits"].contiguous()
            if tp > 1:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)
            outputs = logits[..., :cfg.model.vocab_size].tolist()
    finally:
        destroy_distributed()
    return outputs


def _rntp(rank: int, world_size: int, argv: list[str]) -> int:
    from rntp_megatron.cli import main

    return main(argv)


def _rntp_error(rank: int, world_size: int, argv: list[str]) -> str:
    """The message of the error `rntp argv` raises ('' when it succeeds)."""
    from rntp_megatron.cli import main

    try:
        main(argv)
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        return f"{type(e).__name__}: {e}"
    return ""


def _hf_logits(folder: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("card,tp,pp", [("tiny", 2, 1), ("tiny_qwen3", 1, 2)])
def test_export_from_any_layout_loads_in_transformers_with_matching_logits(tmp_path, card, tp, pp):
    import transformers

    ranks = run_ranks(_save_random_checkpoint, tp * pp, (card, tp, pp, str(tmp_path / "ckpt")))
    megatron_logits = torch.tensor(ranks[-1])  # the last rank is on the last stage
    out = tmp_path / "hf"
    # one process: dist_checkpointing reshards the TP2 / PP2 checkpoint to TP1
    [rc] = run_ranks(_rntp, 1, (["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)],))
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == 0 and generation.do_sample
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("hi")["input_ids"] == [ord("h"), ord("i")]
    hf_logits = _hf_logits(out)
    assert hf_logits.shape == megatron_logits.shape
    err = (hf_logits - megatron_logits).abs().max().item()
    assert err < 1e-4, f"{card} saved at TP{tp} PP{pp}: max |HF - Megatron| logit = {err}"


def _write_hf_model(card: str, folder: Path, seed: int = 0) -> None:
    """A random float32 HF model of the card's family, saved with safetensors in several shards."""
    import transformers

    from rntp_megatron.config import build_config
    from rntp_megatron.model import hf_mapping

    cfg = build_config({"model": {"card": card}}).model
    config = transformers.AutoConfig.for_model(**hf_mapping.hf_config(cfg, torch_dtype="float32"))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="100KB")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder

    st = SafetensorsFolder(folder)
    return {k: st[k] for k in st}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("card", FAMILIES)
def test_import_then_export_is_bit_exact(tmp_path, card):
    from rntp_megatron.model.hf_mapping import model_fields_from_hf

    source, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    _write_hf_model(card, source)
    assert (source / "model.safetensors.index.json").exists()  # sharded input
    imported = run_ranks(_rntp, 2, (["convert", "from-hf", "--hf", str(source), "--out", str(ckpt), "--tp", "2"],))
    assert imported == [0, 0] and (ckpt / "latest").read_text().strip() == "iter_0000000"
    [rc] = run_ranks(_rntp, 1, (["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(back)],))  # at TP1
    assert rc == 0
    original, exported = _tensors(source), _tensors(back)
    assert sorted(original) == sorted(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (source, back))
    assert model_fields_from_hf(out_cfg) == model_fields_from_hf(src_cfg)


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors, no output left behind.


def _to_hf_args(ckpt: Path, out: Path):
    return argparse_namespace(direction="to-hf", checkpoint=str(ckpt), out=str(out), config=None, overrides=[],
                              tokenizer=None, dtype=None, fp8=False, overwrite=False, tp=None, pp=1)


def test_missing_and_incomplete_checkpoints_fail_clearly(tmp_path):
    from rntp_megatron import convert

    out = tmp_path / "hf"
    with pytest.raises(convert.ConvertError, match="does not exist"):
        convert.to_hf(_to_hf_args(tmp_path / "nowhere", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(convert.ConvertError, match="nor a checkpoint directory with a `latest`"):
        convert.to_hf(_to_hf_args(tmp_path / "empty", out))
    broken = tmp_path / "broken"
    (broken / "iter_0000003").mkdir(parents=True)  # a save that died before completing
    (broken / "latest").write_text("iter_0000003")
    with pytest.raises(convert.ConvertError, match="iter_0000003.*complete.json"):
        convert.to_hf(_to_hf_args(broken, out))
    assert not out.exists()


@pytest.mark.distributed
def test_corrupt_checkpoint_fails_clearly_and_leaves_no_output(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    run_ranks(_save_random_checkpoint, 1, ("tiny", 1, 1, str(ckpt)))
    shards = list((ckpt / "iter_0000003").glob("*.distcp"))
    assert shards
    for f in shards:  # truncated shard files
        f.write_bytes(f.read_bytes()[:100])
    [message] = run_ranks(_rntp_error, 1, (["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out)],))
    assert "cannot load" in message and "iter_0000003" in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")], "temporary output left behind"


def test_unsupported_architecture_and_bad_layout_fail_before_writing(tmp_path, monkeypatch):
    from rntp_megatron import convert

    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                    "n_layer": 2, "n_embd": 64}))
    args = argparse_namespace(direction="from-hf", hf=str(source), out=str(tmp_path / "out"), tp=None, pp=1,
                              overwrite=False)
    with pytest.raises(Exception, match="GPT2LMHeadModel.*not one of"):
        convert.from_hf(args)
    assert not (tmp_path / "out").exists()

    llama = tmp_path / "llama"
    _write_hf_model("tiny", llama)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun --nproc_per_node=3
    with pytest.raises(ConfigError, match=r"TP=3 must divide model.num_attention_heads=4"):
        convert.from_hf(argparse_namespace(direction="from-hf", hf=str(llama), out=str(tmp_path / "out"), tp=3,
                                           pp=1, overwrite=False))
    with pytest.raises(ConfigError, match=r"TP=2 x PP=1 needs 2 processes, this is 3"):
        convert.from_hf(argparse_namespace(direction="from-hf", hf=str(llama), out=str(tmp_path / "out"), tp=2,
                                           pp=1, overwrite=False))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"PP=4 must divide model.num_layers=2"):
        convert.from_hf(argparse_namespace(direction="from-hf", hf=str(llama), out=str(tmp_path / "out"), tp=None,
                                           pp=4, overwrite=False))
    assert not (tmp_path / "out").exists()
    # an existing output is never overwritten silently
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(convert.ConvertError, match="exists and is not empty"):
        convert.from_hf(argparse_namespace(direction="from-hf", hf=str(llama), out=str(tmp_path / "out"), tp=None,
                                           pp=1, overwrite=False))
    assert (tmp_path / "out" / "keep").read_text() == "x"


def argparse_namespace(**kwargs):
    import argparse

    return argparse.Namespace(**kwargs)


SGLANG_PYTHON = Path(os.environ.get("RNTP_SGLANG_PYTHON", Path(__file__).resolve().parents[1] / "sglang-venv/bin/python"))


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.distributed
def test_sglang_server_serves_the_exported_folder(tmp_path):
    """A real SGLang server loads the exported folder; its prompt log-probs are the Megatron model's."""
    if not SGLANG_PYTHON.exists():
        pytest.skip(f"SGLang server virtualenv missing ({SGLANG_PYTHON}); run tools/install_sglang.sh")
    from rntp_megatron.config import SGLangConfig
    from rntp_megatron.rollout.sglang.engine import SGLangEngine
    from rntp_megatron.runtime.spawn import free_port

    ranks = run_ranks(_save_random_checkpoint, 2, ("tiny_qwen2", 2, 1, str(tmp_path / "ckpt")))
    logits = torch.tensor(ranks[0], dtype=torch.float64)
    tokens = torch.tensor(TOKENS)
    # log p(token[t] | token[<t]) for t >= 1 under the Megatron model
    expected = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    [rc] = run_ranks(_rntp, 1, (["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                                 str(tmp_path / "hf")],))
    assert rc == 0
    engine = SGLangEngine(SGLangConfig(python=str(SGLANG_PYTHON), port=free_port(), max_restarts=0),
                          model_path=tmp_path / "hf", run_dir=tmp_path / "server", dtype="float32")
    try:
        served = engine.prompt_logprobs(TOKENS)
    finally:
        engine.close()
    for row, want in zip(served, expected.tolist()):
        got = [x for x in row if x is not None][-len(want):]
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want)) < 2e-4, (got, want)


# ---------------------------------------------------------------------------------------------------
# --fp8: blockwise FP8 linear weights + weight_scale_inv and the quantization_config SGLang and transformers read.

FP8_MODEL = {"card": "tiny", "hidden_size": 128, "ffn_hidden_size": 256}  # 128-aligned, as FP8 loaders need


def _export_plain_and_fp8(rank: int, world_size: int, ckpt: str, out: str) -> list[int]:
    from rntp_megatron.cli import main

    base = ["convert", "to-hf", "--checkpoint", ckpt]
    return [main([*base, "--out", f"{out}/plain"]), main([*base, "--out", f"{out}/fp8", "--fp8"])]


@pytest.mark.slow
def test_fp8_export_dequantizes_to_the_plain_export_and_loads_in_transformers(tmp_path):
    import transformers

    from rntp_megatron.weights.fp8 import E4M3_MAX, dequantize_blockwise, is_fp8_linear

    [logits] = run_ranks(_save_random_checkpoint, 1, (FP8_MODEL, 1, 1, str(tmp_path / "ckpt")))
    [codes] = run_ranks(_export_plain_and_fp8, 1, (str(tmp_path / "ckpt"), str(tmp_path)))
    assert codes == [0, 0]
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    assert config["torch_dtype"] == "float32"
    plain, fp8 = _tensors(tmp_path / "plain"), _tensors(tmp_path / "fp8")
    linear = [n for n in plain if is_fp8_linear(n)]
    assert len(linear) == 2 * 7 and set(fp8) == set(plain) | {n + "_scale_inv" for n in linear}
    for name, want in plain.items():
        got = fp8[name]
        if name not in linear:
            assert got.dtype == want.dtype and torch.equal(got, want), name
            continue
        scale = fp8[name + "_scale_inv"]
        assert got.dtype == torch.float8_e4m3fn and scale.shape == (-(-want.shape[0] // 128), -(-want.shape[1] // 128))
        assert scale.max().item() == pytest.approx(want.abs().max().item() / E4M3_MAX, rel=1e-6)
        err = (dequantize_blockwise(got, scale) - want).abs()
        # e4m3: 3 mantissa bits, relative rounding <= 2^-4; below the normal range, absolute <= 2^-9 * scale
        assert (err <= want.abs() * 2.0 ** -4 + scale.max() * 2.0 ** -9).all(), name
    # transformers reads the quantization_config (FineGrainedFP8; on CPU it dequantizes, to bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32).eval()
    loaded = model.state_dict()
    for name in linear:  # the same blocks and scales as ours, up to bfloat16 rounding
        ours = dequantize_blockwise(fp8[name], fp8[name + "_scale_inv"])
        assert torch.allclose(loaded[name].float(), ours, rtol=2.0 ** -8, atol=0), name
    # logits: the plain folder with our dequantized weights in float32 is the reference; the FP8 model differs
    # from it by bfloat16 rounding at most, and the reference from the unquantized model by the FP8 rounding
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32)
    reference.load_state_dict({n: dequantize_blockwise(fp8[n], fp8[n + "_scale_inv"]) for n in linear}, strict=False)
    with torch.no_grad():
        got, ref = (m.eval()(torch.tensor(TOKENS)).logits.float() for m in (model, reference))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    assert rel(got, ref) < 0.02  # measured 0.0 (transformers 5.24 dequantizes to the float32 asked for)
    assert 0 < rel(ref, torch.tensor(logits)) < 0.3  # FP8 rounding, grown through layers of init std 0.2: 0.14
