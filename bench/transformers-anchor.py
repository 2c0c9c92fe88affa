"""The anchor beside qwen3_bench and gpt2_bench: Hugging Face transformers' own models at the same
shapes (Qwen3: hidden 512, intermediate 1536, 4 layers, 8/4 heads, head_dim 64, vocab 4096; GPT-2:
n_embd 512, 4 layers, 8 heads, vocab 4096), eager and compiled by torch.compile (Inductor), for a
decode step after 64 cached tokens, 16 and 128 tokens; milliseconds per forward, medians of 5
rounds. Runs in the sid chroot (python3-transformers, python3-torch with libopenblas0-openmp: without
it Debian's torch runs the reference BLAS, 10-30x slower; Inductor needs g++ and python3-dev):

    scripts/in-chroot /var/cache/torch-module-fusion/sid python3 /src/bench/transformers-anchor.py [threads]
"""
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

SHAPES = [("decode, 64 cached", 1, 64), ("16 tokens", 16, 0), ("128 tokens", 128, 0)]


def models():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=256, n_embd=512, n_layer=4,
                                      n_head=8, bos_token_id=None, eos_token_id=None))
    return [("Qwen3", qwen3.eval()), ("GPT-2", gpt2.eval())]


def time_forward(model, tokens, cached, compiled):
    torch.manual_seed(1)
    prompt = torch.randint(0, 4096, (1, cached))
    ids = torch.randint(0, 4096, (1, tokens))
    forward = torch.compile(model) if compiled else model
    base = None
    if cached:
        base = DynamicCache(config=model.config)
        model(prompt, past_key_values=base, use_cache=True)

    def run():
        if not cached:
            return forward(ids, use_cache=False)
        cache = DynamicCache(config=model.config)
        for layer in range(len(base.layers)):
            cache.update(base.layers[layer].keys, base.layers[layer].values, layer)
        return forward(ids, past_key_values=cache, use_cache=True)

    for _ in range(3):  # warm-up (and compilation)
        run()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < 1.0:
            run()
            n += 1
        rounds.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(rounds), max(rounds) - min(rounds)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), BLAS: {torch.__config__.show().count('openblas')} "
          f"mention(s) of openblas in the build config")
    with torch.no_grad():
        for name, model in models():
            for label, tokens, cached in SHAPES:
                eager, eager_spread = time_forward(model, tokens, cached, False)
                try:
                    compiled, spread = time_forward(model, tokens, cached, True)
                    inductor = f"{compiled:.2f} ms (spread {spread:.2f})"
                except Exception as error:  # say why, do not hide the eager figure
                    inductor = f"failed: {type(error).__name__}: {str(error)[:120]}"
                print(f"{name} {label}: eager {eager:.2f} ms (spread {eager_spread:.2f}), "
                      f"inductor {inductor}")


if __name__ == "__main__":
    main()
