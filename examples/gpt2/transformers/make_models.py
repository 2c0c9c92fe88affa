"""Saves seeded random GPT-2 models with Hugging Face transformers, and what transformers computes
for them, for the C++ port to match (examples/common/transformers-parity.sh runs it in a Debian
sid chroot, whose python3-transformers is 5.x).

    python3 make_models.py OUT_DIR

Each OUT_DIR/<case>/ holds the model as save_pretrained writes it (one then rewritten as the
original OpenAI checkpoints come: GPT2Model's keys without "transformer.", with the attention's
causal-mask buffers) and expected.json: the prompt, transformers' float32 logits for it
(expected_logits.f32, raw little-endian) and its greedy generate() ids.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

PROMPT = [3, 17, 42, 99, 5, 200, 7, 64]
NEW_TOKENS = 10

# (name, stored dtype, tied embeddings, sharded)
CASES = [
    ("f32-tied-single", torch.float32, True, False),
    ("f32-tied-sharded", torch.float32, True, True),
    ("f32-untied-single", torch.float32, False, False),
    ("bf16-tied-sharded", torch.bfloat16, True, True),
]


def build(dtype, tied, seed):
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # weights at a scale that gives varied logits, as the C++ tiny model
        for name, param in model.named_parameters():
            if "ln_" in name:
                if name.endswith("bias"):
                    param.uniform_(-0.1, 0.1)
                else:
                    param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.08)
    return model.to(dtype)


def record(path, prompt):
    """transformers' logits and greedy ids for the model saved at `path`."""
    loaded = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(prompt).logits[0].contiguous()
    logits.numpy().astype("<f4").tofile(os.path.join(path, "expected_logits.f32"))
    generated = loaded.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump({"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS,
                   "logits": {"file": "expected_logits.f32", "shape": list(logits.shape)},
                   "generated_ids": generated}, f, indent=1)
    return generated


def as_openai_checkpoint(path):
    """GPT2Model's keys (no "transformer." prefix, no lm_head) and the causal-mask buffers
    h.N.attn.bias that older exports hold: transformers loads it into GPT2LMHeadModel."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    renamed = {k[len("transformer."):]: v for k, v in tensors.items()
               if k.startswith("transformer.")}
    for layer in range(2):
        renamed[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    save_file(renamed, file, metadata={"format": "pt"})


def main():
    out = sys.argv[1]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    prompt = torch.tensor([PROMPT])
    for seed, (name, dtype, tied, sharded) in enumerate(CASES, start=1):
        path = os.path.join(out, name)
        model = build(dtype, tied, seed)
        model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=None)
        model.save_pretrained(path, max_shard_size="100KB" if sharded else "1GB")
        generated = record(path, prompt)
        print(f"{name}: {len(generated) - len(PROMPT)} new ids, files {sorted(os.listdir(path))}")
    path = os.path.join(out, "f32-openai-keys-with-attn-bias")
    model = build(torch.float32, True, len(CASES) + 1)
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=None)
    model.save_pretrained(path)
    as_openai_checkpoint(path)
    generated = record(path, prompt)
    print(f"f32-openai-keys-with-attn-bias: {len(generated) - len(PROMPT)} new ids")


if __name__ == "__main__":
    main()
