"""vLLM's start-up to its first token, with `--load-format model-loader` against `auto`.

Run by model-loader-bench (`--vllm`, and in `just bench`) with the Python of the vLLM
environment (scripts/vllm-env):

  vllm_peer.py make --out DIR --mib N
      a Llama of about N MiB (F32, head_dim 64: vLLM's CPU kernels take it) saved by
      transformers with a small tokenizer; prints {"bytes": ...}.
  vllm_peer.py time --folder DIR --small DIR --model-id ID --socket S --server ADDR --runs N
      N rounds, alternating: a fresh process per engine (start-up is what is timed), `auto` from
      DIR against `model-loader` from the server (DIR's small files only, in --small); prints
      the seconds from LLM() to the first token, those of the model load within them (vLLM's
      BaseModelLoader.load_model: build, weights, post-processing), and whether both generated
      the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "the model keeps its weights in shared memory"


def make(args: argparse.Namespace) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, (args.mib * 2**20 // 4 - 2 * vocab * hidden) // per_layer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PROMPT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(args.out)
    print(json.dumps({"bytes": sum(t.numel() * t.element_size()
                                   for t in model.state_dict().values())}))


def one(args: argparse.Namespace) -> None:
    """One engine: LLM() to its first token (greedy, 8 tokens in all, the first timed)."""
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): time its model load
    # (build, weights, post-processing), which either loader inherits.
    loading = []
    inner = BaseModelLoader.load_model

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return inner(self, *a, **kw)
        finally:
            loading.append(time.perf_counter() - t)

    BaseModelLoader.load_model = timed

    llm = LLM(model=args.folder, load_format=args.load_format,
              model_loader_extra_config=json.loads(args.extra), dtype="float32",
              enforce_eager=True, max_model_len=128, seed=0)
    first = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))[0]
    first_token = time.perf_counter() - start
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out.outputs[0].token_ids[0] == first.outputs[0].token_ids[0]
    import torch
    import vllm

    print("RESULT " + json.dumps({"first_token_s": first_token, "model_load_s": sum(loading),
                                  "tokens": list(out.outputs[0].token_ids),
                                  "versions": f"vllm {vllm.__version__}, torch {torch.__version__}"}),
          flush=True)


def time_them(args: argparse.Namespace) -> None:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1")
    extra = json.dumps({"socket": args.socket, "server": args.server, "model_id": args.model_id})
    paths = {"auto": (args.folder, "{}"), "model-loader": (args.small, extra)}
    seconds = {name: [] for name in paths}
    loading = {name: [] for name in paths}
    tokens = {}
    versions = ""
    for _ in range(args.runs):
        for name, (folder, settings) in paths.items():
            run = subprocess.run([sys.executable, __file__, "one", "--folder", folder,
                                  "--load-format", name, "--extra", settings], env=env,
                                 text=True, capture_output=True, timeout=900)
            log = run.stdout + run.stderr
            if run.returncode != 0:
                sys.exit(f"vLLM with load format {name} failed:\n{log[-4000:]}")
            result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
            seconds[name].append(result["first_token_s"])
            loading[name].append(result["model_load_s"])
            tokens[name] = result["tokens"]
            versions = result["versions"]
    print(json.dumps({
        "seconds": {"auto": seconds["auto"], "model_loader": seconds["model-loader"]},
        "model_load_s": {"auto": loading["auto"], "model_loader": loading["model-loader"]},
        "same": tokens["auto"] == tokens["model-loader"],
        "tokens": tokens["model-loader"],
        "versions": versions,
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--mib", type=int, default=512)
    p = sub.add_parser("time")
    for flag in ("--folder", "--small", "--model-id", "--socket", "--server"):
        p.add_argument(flag, required=True)
    p.add_argument("--runs", type=int, default=3)
    p = sub.add_parser("one")
    p.add_argument("--folder", required=True)
    p.add_argument("--load-format", required=True)
    p.add_argument("--extra", default="{}")
    args = parser.parse_args()
    {"make": make, "time": time_them, "one": one}[args.command](args)


if __name__ == "__main__":
    main()
