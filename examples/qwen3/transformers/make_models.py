"""Saves seeded random Qwen3 models with Hugging Face transformers, and what transformers computes
for them, for the C++ port to match (examples/qwen3/transformers/parity.sh runs it in a Debian sid
chroot, whose python3-transformers is 5.x).

    python3 make_models.py OUT_DIR

Each OUT_DIR/<case>/ holds the model as save_pretrained writes it and expected.json: the prompt,
transformers' float32 logits for it (expected_logits.f32, raw little-endian) and its greedy
generate() ids.
"""
import json
import os
import sys

import torch
import transformers
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

PROMPT = [3, 17, 42, 99, 5, 200, 7, 64]
NEW_TOKENS = 10

# (name, stored dtype, tied embeddings, sharded, rope parameters, stop at an eos id)
CASES = [
    ("bf16-untied-single-default", torch.bfloat16, False, False, {"rope_type": "default"}, False),
    ("f32-tied-sharded-default", torch.float32, True, True, {"rope_type": "default"}, True),
    ("f32-untied-sharded-yarn", torch.float32, False, True,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, False),
    ("bf16-tied-single-yarn", torch.bfloat16, True, False,
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
      "beta_fast": 16.0}, True),
    ("f32-untied-single-linear", torch.float32, False, False,
     {"rope_type": "linear", "factor": 3.0}, False),
]


def build(dtype, tied, rope, seed):
    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters=dict(rope, rope_theta=50000.0))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # weights at a scale that gives varied logits, as the C++ tiny model
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.08)
    return model.to(dtype)


def greedy(model, prompt):
    ids = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids[0].tolist()


def main():
    out = sys.argv[1]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    prompt = torch.tensor([PROMPT])
    for seed, (name, dtype, tied, sharded, rope, stop) in enumerate(CASES, start=1):
        path = os.path.join(out, name)
        model = build(dtype, tied, rope, seed)
        model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=None)
        if stop:  # an eos id that greedy decoding first reaches at the fourth new token or later
            model.save_pretrained(path, max_shard_size="100KB" if sharded else "1GB")
            loaded = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            new = greedy(loaded, prompt)[len(PROMPT):]
            eos = next((t for i, t in enumerate(new) if i >= 3 and t not in new[:i]), new[-1])
            model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=None)
        model.save_pretrained(path, max_shard_size="100KB" if sharded else "1GB")

        loaded = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = loaded(prompt).logits[0].contiguous()
        logits.numpy().astype("<f4").tofile(os.path.join(path, "expected_logits.f32"))
        generated = greedy(loaded, prompt)
        with open(os.path.join(path, "expected.json"), "w") as f:
            json.dump({"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS,
                       "logits": {"file": "expected_logits.f32", "shape": list(logits.shape)},
                       "generated_ids": generated}, f, indent=1)
        files = sorted(os.listdir(path))
        print(f"{name}: {len(generated) - len(PROMPT)} new ids, files {files}")


if __name__ == "__main__":
    main()
