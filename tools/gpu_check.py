"""One script for a lent GPU (1 x H100/H200): numerical agreement with the CPU, and training throughput.

    # on a CPU machine: the reference (weights + logits of the tiny card, float32)
    python tools/gpu_check.py reference --out gpu_check_ref.safetensors
    # on the GPU machine (megatron-core installed; TE optional)
    python tools/gpu_check.py check --ref gpu_check_ref.safetensors [--steps 10]

`check` prints a table: max |logits diff| of the tiny model on CUDA against the CPU reference in float32
(tolerance 1e-4) and in bf16 autocast (tolerance 5e-2 relative), then a ~1B-parameter llama-style model's
training step (bf16, Megatron optimizer): tokens/s and MFU = 6 N tokens/s / peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}
ONE_B = {"family": "llama", "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 5632,
         "num_attention_heads": 16, "num_query_groups": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
         "params_dtype": "bfloat16"}


def _init(model: dict, params_dtype: str | None = None):
    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import init_distributed
    cfg = build_config({"model": {**model, **({"params_dtype": params_dtype} if params_dtype else {})},
                        "schedule": {"lr": 1e-4, "clip_grad": 1.0}})
    init_distributed(cfg.parallel, seed=1234)
    return cfg


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def make_reference(out: str) -> None:
    """Tiny-card weights and logits on CPU, float32, into one safetensors file."""
    from safetensors.torch import save_file

    from rntp_megatron.model.provider import build_model

    cfg = _init({"card": "tiny"})
    model = build_model(cfg.model, cfg.parallel).eval()
    tokens = _tokens(256, 2, 64)
    with torch.no_grad():
        logits = model(tokens, torch.arange(64).expand(2, 64), None)
    tensors = {f"weight.{k}": v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
               and not k.endswith("_extra_state")}
    save_file({**tensors, "tokens": tokens, "logits": logits.contiguous()}, out)
    print(f"wrote {out}: {len(tensors)} weights, logits {tuple(logits.shape)}")


def check(ref_path: str, steps: int, gpu: str) -> int:
    from safetensors.torch import load_file

    from rntp_megatron.lm_loss import lm_batch, lm_forward_step
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import build_optimizer, wrap_ddp
    from rntp_megatron.step import train_step

    assert torch.cuda.is_available(), "check needs a CUDA GPU"
    ref = load_file(ref_path)
    cfg = _init({"card": "tiny", "transformer_impl": "local"})
    model = build_model(cfg.model, cfg.parallel).eval()
    model.load_state_dict({k[len("weight."):]: v for k, v in ref.items() if k.startswith("weight.")}, strict=False)
    tokens = ref["tokens"].cuda()
    positions = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)
    rows = []
    with torch.no_grad():
        fp32 = model(tokens, positions, None).float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(tokens, positions, None).float().cpu()
    scale = ref["logits"].abs().max().item()
    d32 = (fp32 - ref["logits"]).abs().max().item()
    d16 = (bf16 - ref["logits"]).abs().max().item() / scale
    rows += [("tiny fp32 max|diff| vs CPU", f"{d32:.2e}", d32 <= 1e-4),
             ("tiny bf16 max|diff|/max|logit| vs CPU", f"{d16:.2e}", d16 <= 5e-2)]

    big = _init(ONE_B)
    model = build_model(big.model, big.parallel)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = wrap_ddp(model, big.parallel)
    opt = build_optimizer([ddp], big.schedule, big.parallel)
    batch, seq = 4, 2048
    mbs = [{k: v.cuda() for k, v in lm_batch(_tokens(32000, batch, seq + 1)).items()}]
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step([ddp], opt, lm_forward_step, mbs, seq, batch)
    torch.cuda.synchronize()
    tokens_per_s = steps * batch * seq / (time.perf_counter() - t0)
    mfu = 6 * n_params * tokens_per_s / PEAK_BF16[gpu]
    rows += [(f"1B model ({n_params / 1e9:.2f}B params) tokens/s", f"{tokens_per_s:,.0f}", True),
             (f"MFU (6N, {gpu} peak {PEAK_BF16[gpu] / 1e12:.0f} TFLOP/s)", f"{mfu:.1%}", True),
             ("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", True)]
    width = max(len(r[0]) for r in rows)
    for name, value, ok in rows:
        print(f"{name:<{width}}  {value:>12}  {'ok' if ok else 'FAIL'}")
    return 0 if all(ok for _, _, ok in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--out", default="gpu_check_ref.safetensors")
    c = sub.add_parser("check")
    c.add_argument("--ref", default="gpu_check_ref.safetensors")
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--gpu", choices=sorted(PEAK_BF16), default="H100")
    args = parser.parse_args()
    if args.cmd == "reference":
        make_reference(args.out)
        return 0
    return check(args.ref, args.steps, args.gpu)


if __name__ == "__main__":
    sys.exit(main())
