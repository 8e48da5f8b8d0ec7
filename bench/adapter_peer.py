"""Time to a ready transformers model: model_loader.transformers.from_server (attached weights,
the server's memory) against transformers' own from_pretrained of the same folder, warm.

Usage:
  adapter_peer.py make --out DIR --mib N [--dtype float32|bfloat16] [--kind llama|sd]
      writes a Llama of about N MiB (fixed seed) with save_pretrained, and prints its bytes;
      with --kind sd, an SD-1.5-shaped diffusers pipeline instead (F16 for a GPU).
  adapter_peer.py time --runs N --socket SOCKET --model-id ID --folder DIR [--device cpu|cuda:0]
      after one untimed run of each that checks both give the same logits, times N runs of each,
      alternating; prints one JSON object (--kind sd: the pipeline's 2-step images instead).

A run ends with a model ready to run (on a GPU, synchronized). from_pretrained's runs read the
folder from the page cache (its untimed run warmed it). The adapter's runs release their lease
before the next one. On a GPU, the script also reports how much of the GPU's free memory the
attached model took in this process (its own CUDA context is made first, so it is not counted).
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

# The client in this tree, also when an older copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))


def make(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = (1024, 2816, 32000) if args.mib < 4096 else (4096, 14336, 32000)
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // 4) + 3 * hidden * inter
    elem = 2 if args.dtype == "bfloat16" else 4
    layers = max(1, round((args.mib * 2**20 / elem - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype=args.dtype,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    print(json.dumps({"bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}))


def make_pipeline(args):
    """An SD-1.5-shaped pipeline (its UNet, VAE and CLIP text encoder configs; random weights with
    a fixed seed, in --dtype) with a tiny CLIP tokenizer and a PNDM scheduler."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, vocab_size=64, bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=2))
    import pathlib

    tok = pathlib.Path(args.out + "-tokenizer")
    tok.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters])}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), pad_token="!", model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    parts = [pipe.unet, pipe.vae, pipe.text_encoder]
    print(json.dumps({"bytes": sum(t.numel() * t.element_size() for m in parts for t in m.state_dict().values())}))


def time_pipeline(args):
    """The pipeline's 2-step image (fixed seed) and time to ready: the adapter against
    DiffusionPipeline.from_pretrained(folder).to(device), warm."""
    import torch
    from diffusers import DiffusionPipeline

    import model_loader.diffusers as adapter

    device = args.device
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if device.startswith("cuda"):
        torch.empty(1, device=device)

    def from_pretrained():
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype).to(device)
        return ready(device, pipe)

    def from_server():
        return ready(device, adapter.from_server(args.model_id, socket=args.socket, device=device))

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            return pipe("a photo", num_inference_steps=2, generator=generator, output_type="pt").images.cpu()

    same, stats, drop, seconds = compare_and_time(device, args.runs, from_pretrained, from_server, image)
    print(json.dumps({"seconds": seconds, "same": same, "compared": "a 2-step image",
                      "stats": stats, "gpu_free_drop_bytes": drop,
                      "torch": torch.__version__, "framework": "diffusers " + __import__("diffusers").__version__},
                     default=str))


def compare_and_time(device, runs, from_pretrained, from_server, output):
    """Both paths' outputs compared (bit for bit), the adapter's stats and the GPU's free memory
    drop while it builds, then `runs` rounds of both builds alternating, warm: (same, stats,
    drop, seconds)."""
    import torch

    cuda = device.startswith("cuda")
    reference = from_pretrained()
    expected = output(reference)
    del reference
    gc.collect()
    free_before = torch.cuda.mem_get_info()[0] if cuda else 0
    built = from_server()
    free_after = torch.cuda.mem_get_info()[0] if cuda else 0
    same = torch.equal(output(built), expected)
    stats = getattr(built, "model_loader_stats", None)
    stats = dict(vars(stats)) if stats is not None and hasattr(stats, "__dict__") else stats
    del built
    gc.collect()
    seconds = {"from_pretrained": [], "from_server": []}
    for run in range(runs):
        for k in range(2):
            name, build = [("from_pretrained", from_pretrained), ("from_server", from_server)][(k + run) % 2]
            start = time.perf_counter()
            built = build()
            seconds[name].append(time.perf_counter() - start)
            del built
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return same, stats, free_before - free_after, seconds


def ready(device, model):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return model


def logits(model, device):
    import torch

    ids = torch.tensor([[1, 5, 7, 9, 11, 13]], device=device)
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def time_them(args):
    import torch
    from transformers import AutoModelForCausalLM

    import model_loader.transformers as adapter

    device = args.device
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)  # this process's CUDA context, before any measurement

    def from_pretrained():
        kwargs = {"device_map": device} if device.startswith("cuda") else {}
        return ready(device, AutoModelForCausalLM.from_pretrained(args.folder, **kwargs))

    def from_server():
        return ready(device, adapter.from_server(args.model_id, socket=args.socket, device=device))

    same, stats, drop, seconds = compare_and_time(device, args.runs, from_pretrained, from_server,
                                                  lambda model: logits(model, device))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "same": same,
                "compared": "logits",
                "stats": stats,
                "gpu_free_drop_bytes": drop,
                "torch": torch.__version__,
                "framework": "transformers " + __import__("transformers").__version__,
            },
            default=str,
        )
    )


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--mib", type=int, default=512)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t = sub.add_parser("time")
    t.add_argument("--runs", type=int, default=5)
    t.add_argument("--socket", required=True)
    t.add_argument("--model-id", required=True)
    t.add_argument("--folder", required=True)
    t.add_argument("--device", default="cpu")
    for p in (m, t):
        p.add_argument("--kind", default="llama", choices=["llama", "sd"])
    args = parser.parse_args()
    if args.command == "make":
        make_pipeline(args) if args.kind == "sd" else make(args)
    else:
        time_pipeline(args) if args.kind == "sd" else time_them(args)


if __name__ == "__main__":
    main()
