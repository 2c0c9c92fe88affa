"""Saves seeded random Qwen3 models with Hugging Face transformers, and what transformers computes
for them, for the C++ port to match (examples/common/transformers-parity.sh runs it in a Debian sid
chroot, whose python3-transformers is 5.x).

    python3 make_models.py OUT_DIR

Each OUT_DIR/<case>/ holds the model as save_pretrained writes it (some then edited as real
checkpoints come: a tied config with its own lm_head, rope_scaling beside rope_parameters, ...)
and expected.json: the prompt, transformers' float32 logits for it (expected_logits.f32, raw
little-endian) and its greedy generate() ids; or, for a directory transformers refuses to load,
the reason the port must refuse it with.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
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


def build(dtype, tied, rope, seed, head_dim=16):
    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=128,
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


def record(path, prompt):
    """transformers' logits and greedy ids for the model saved at `path`."""
    loaded = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(prompt).logits[0].contiguous()
    logits.numpy().astype("<f4").tofile(os.path.join(path, "expected_logits.f32"))
    generated = greedy(loaded, prompt)
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump({"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS,
                   "logits": {"file": "expected_logits.f32", "shape": list(logits.shape)},
                   "generated_ids": generated}, f, indent=1)
    return generated


def edit_json(path, name, change):
    with open(os.path.join(path, name)) as f:
        data = json.load(f)
    change(data)
    with open(os.path.join(path, name), "w") as f:
        json.dump(data, f, indent=1)


def edit_weights(path, change):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def tied_with_own_lm_head(path, model):
    """A tied config whose file also holds an lm_head.weight unlike the embedding: transformers
    warns and does not tie."""
    def add_head(tensors):
        torch.manual_seed(100)
        tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.08
    edit_weights(path, add_head)


def rope_scaling_beside_parameters(path, model):
    """Both keys, different: transformers 5.12 takes `rope_scaling or rope_parameters`."""
    edit_json(path, "config.json",
              lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 4.0}))


def eos_in_config_only(path, model):
    """`model.config.eos_token_id = k` then save_pretrained: generation_config.json has no eos,
    and transformers does not read config.json's."""
    generated = record(path, torch.tensor([PROMPT]))
    edit_json(path, "config.json", lambda c: c.update(eos_token_id=generated[len(PROMPT) + 1]))


def penalties_and_sampling_fields(path, model):
    """Settings that change greedy decoding (repetition_penalty, min_new_tokens against an eos id
    that would come early), beside the sampling fields a real Qwen3 checkpoint carries."""
    settings = {"repetition_penalty": 1.3, "do_sample": True, "temperature": 0.6, "top_k": 20,
                "top_p": 0.95}
    edit_json(path, "generation_config.json", lambda g: g.update(settings))
    generated = record(path, torch.tensor([PROMPT]))
    edit_json(path, "generation_config.json",
              lambda g: g.update(eos_token_id=generated[len(PROMPT) + 1], min_new_tokens=4))


def no_head_dim(path, model):
    """A config.json without head_dim: transformers 5 takes 128, not hidden / heads."""
    edit_json(path, "config.json", lambda c: c.pop("head_dim"))


def swish_and_inv_freq(path, model):
    """hidden_act "swish" (SiLU in transformers) and a rotary inv_freq tensor in the file, as
    older exports wrote it (transformers ignores it)."""
    edit_json(path, "config.json", lambda c: c.update(hidden_act="swish"))
    edit_weights(path, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(8)}))


# (name, edit after save_pretrained, model settings)
EDITED = [
    ("f32-tied-own-lm-head", tied_with_own_lm_head, dict(tied=True)),
    ("f32-rope-scaling-beside-parameters", rope_scaling_beside_parameters,
     dict(rope={"rope_type": "linear", "factor": 2.0})),
    ("f32-eos-in-config-only", eos_in_config_only, {}),
    ("f32-penalties-and-sampling-fields", penalties_and_sampling_fields, {}),
    ("f32-no-head-dim", no_head_dim, dict(head_dim=128)),
    ("f32-swish-inv-freq", swish_and_inv_freq, {}),
]


def yarn_without_factor(path):
    """transformers refuses yarn without factor (a KeyError naming it); the port must too."""
    model = build(torch.float32, False, {"rope_type": "default"}, 90)
    model.save_pretrained(path)
    edit_json(path, "config.json", lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 64,
                         "rope_theta": 50000.0}))
    try:
        Qwen3ForCausalLM.from_pretrained(path)
    except KeyError as error:
        assert "factor" in str(error), error
    else:
        raise AssertionError("transformers loaded yarn without factor")
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump({"refusal": "of rope type 'yarn' has no 'factor'"}, f)


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
        generated = record(path, prompt)
        files = sorted(os.listdir(path))
        print(f"{name}: {len(generated) - len(PROMPT)} new ids, files {files}")
    for seed, (name, edit, settings) in enumerate(EDITED, start=len(CASES) + 1):
        path = os.path.join(out, name)
        model = build(torch.float32, settings.get("tied", False),
                      settings.get("rope", {"rope_type": "default"}), seed,
                      head_dim=settings.get("head_dim", 16))
        model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=None)
        model.save_pretrained(path)
        edit(path, model)
        generated = record(path, prompt)
        print(f"{name}: {len(generated) - len(PROMPT)} new ids")
    yarn_without_factor(os.path.join(out, "refused-yarn-without-factor"))
    print("refused-yarn-without-factor: refused by transformers")


if __name__ == "__main__":
    main()
