"""Hugging Face tokenizer folders with the special-token layout of a model family, over a 256-id byte-level
vocabulary (no merges), built here with `tokenizers`: what a test needs of Qwen3's or Llama 3's tokenizer
without downloading one.

qwen3: bytes, then Qwen3's 26 added tokens in its order (<|endoftext|> .. <think>, </think>; eos <|im_end|>,
       pad <|endoftext|>).  llama3: bytes, then Llama 3.1's 256 special tokens (<|begin_of_text|>,
       <|end_of_text|>, <|reserved_special_token_k|> ..., <|eot_id|>, ...), eos <|end_of_text|>, no pad.
"""

from __future__ import annotations

from pathlib import Path

QWEN3_ADDED = [  # (text, special) in Qwen3's order after its BPE vocabulary
    *((t, True) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                          "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]),
    ("<tool_call>", False), ("</tool_call>", False),
    *((t, False) for t in ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                           "<|file_sep|>"]),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]


def llama3_specials() -> list[str]:
    """Llama 3.1's 256 special tokens in id order (128000 ..)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
    out, k = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{k}|>")
            k += 1
    return out


def write_family_tokenizer(out_dir: str | Path, family: str) -> Path:
    """A tokenizer folder of `family` ('qwen3' or 'llama3') at out_dir; returns it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    if family == "qwen3":
        for text, special in QWEN3_ADDED:
            raw.add_tokens([AddedToken(text, special=special, normalized=False)])
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    elif family == "llama3":
        raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in llama3_specials()])
        names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    else:
        raise ValueError(f"no tokenizer layout for family {family!r}")
    out = Path(out_dir)
    PreTrainedTokenizerFast(tokenizer_object=raw, **names).save_pretrained(str(out))
    return out
