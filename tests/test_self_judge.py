"""The self_judge reward: the model judges its own answer against the true text, r = p_J(" yes" | template); the
judge is the policy (or the frozen reference), run forward-only by the trainer on the filled template."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.config import ConfigError, build_config
from rntp_megatron.runtime.spawn import run_ranks


def test_a_reference_judge_needs_a_reference():
    with pytest.raises(ConfigError, match="reward.params.judge_model=reference needs a frozen reference"):
        build_config({"reward": {"name": "self_judge", "params": {"judge_model": "reference"}}})
    assert build_config({"reward": {"name": "self_judge"}}).rl.train_on == "thought_and_answer"


def _judge(rank: int, world: int, tmp: str) -> dict:
    from rntp_megatron.config import build_config
    from rntp_megatron.rewards.judge import SELF_JUDGE_TEMPLATE
    from rntp_megatron.rollout.engine import Rollout
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    cfg = build_config({"model": {"card": "tiny", "vocab_size": 262, "init_method_std": 0.3},
                        "data": {"sources": [{"kind": "pydoc"}], "context_len": 40, "min_context": 8,
                                 "answer_horizon": 3},
                        "rollout": {"max_new_tokens": 16}, "reward": {"name": "self_judge"}, "rl": {"group_size": 2},
                        "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "seq_length": 64},
                        "logging": {"dir": f"{tmp}/run", "progress": False, "plot": False}})
    trainer = Trainer(cfg)
    try:
        eps = trainer.stream.take(2)
        tok = trainer.tokenizer
        texts = [f"x</think><answer>{eps[0].continuation_text}</answer>", "x</think><answer>zq</answer>",
                 "no answer at all", f"y</think><answer>{eps[1].continuation_text[:1]}</answer>"]
        rollouts = [Rollout(eps[i // 2].prompt_ids, tok.encode(t), t, [0.0] * len(tok.encode(t)), "stop",
                            prompt_index=i // 2) for i, t in enumerate(texts)]
        shaped, _ = trainer._rewards(eps, rollouts)
        yes = tok.encode(" yes")
        want = []
        for i, text in enumerate(texts):
            answer = text.split("<answer>")[1].split("</answer>")[0] if "<answer>" in text else None
            if not answer:
                want.append(0.0)
                continue
            ids = tok.encode(SELF_JUDGE_TEMPLATE.format(truth=eps[i // 2].continuation_text, answer=answer)) + yes
            with torch.no_grad():  # float64 log-softmax of a plain forward of the policy over the filled template
                logits = trainer.model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :, :262].double()
            logp = torch.log_softmax(logits, -1)
            n = len(ids) - len(yes)
            want.append(float(torch.exp(sum(logp[n - 1 + k, y] for k, y in enumerate(yes)))))
        return {"got": shaped.terms["reward_base"].tolist(), "want": want}
    finally:
        trainer.close()
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
def test_self_judge_is_the_policys_probability_of_yes(tmp_path):
    (out,) = run_ranks(_judge, 1, args=(str(tmp_path),))
    assert out["got"][2] == 0.0 and out["want"][2] == 0.0
    assert min(out["want"][:2] + out["want"][3:]) > 0
    torch.testing.assert_close(torch.tensor(out["got"]), torch.tensor(out["want"]), rtol=1e-4, atol=1e-7)
