"""Small models built from configs with fixed seeds and saved the frameworks' own way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

# Text the tokenizers are trained on and the models are run on.
TEXT = ["the server keeps the weights", "a model attached from shared memory",
        "tokens and tensors travel over a socket"]
PROMPT = "the model keeps its weights in shared memory"


def word_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on TEXT, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _save_lm(model: Any, path: Path, vocab_size: int) -> Path:
    model.save_pretrained(path)
    word_tokenizer(vocab_size).save_pretrained(path)
    return path


def llama(path: Path) -> Path:
    """A Llama of about 100 MB (F32): big enough that a copy would show in RssAnon, well above
    what torch's first forward pass allocates for itself (about 15 MB here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=3, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=128)
    return _save_lm(LlamaForCausalLM(config), path, 300)


def qwen2_tied(path: Path) -> Path:
    """A Qwen2 whose LM head is its embedding (tie_word_embeddings: no lm_head in the file)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=128)
    return _save_lm(Qwen2ForCausalLM(config), path, 300)


def qwen2_moe(path: Path) -> Path:
    """A Qwen2-MoE: transformers fuses its per-expert weights on load (copies them)."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(2)
    config = Qwen2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128)
    return _save_lm(Qwen2MoeForCausalLM(config), path, 300)


def bert_sentence(path: Path) -> Path:
    """A BERT saved as a sentence-transformers model: Transformer, mean Pooling, Normalize, with a
    WordPiece tokenizer from a small vocab.txt."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(3)
    raw = path.parent / (path.name + "-bert")
    words = sorted({w for line in TEXT + [PROMPT] for w in line.split()})
    raw.mkdir(parents=True)
    (raw / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizer(str(raw / "vocab.txt")).save_pretrained(raw)
    config = BertConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    BertModel(config).save_pretrained(raw)
    transformer = Transformer(str(raw))
    model = SentenceTransformer(modules=[transformer, Pooling(64, "mean"), Normalize()],
                                device="cpu")
    model.save(str(path))
    return path


def _clip_tokenizer(path: Path) -> None:
    """CLIP's BPE over a tiny vocabulary: every letter alone and at a word's end, a few merges."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab: Dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    merges = ["t h", "th e</w>", "e r</w>", "i n"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                  pad_token="!", model_max_length=77).save_pretrained(path)


def stable_diffusion(path: Path) -> Path:
    """A tiny Stable Diffusion pipeline: UNet, VAE, CLIP text encoder and tokenizer, PNDM."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=16)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
        norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=2,
        vocab_size=64, max_position_embeddings=77))
    tok_dir = path.parent / (path.name + "-tokenizer")
    _clip_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


BUILDERS: Dict[str, Callable[[Path], Path]] = {
    "llama": llama,
    "qwen2-tied": qwen2_tied,
    "qwen2-moe": qwen2_moe,
    "bert-st": bert_sentence,
    "tiny-sd": stable_diffusion,
}


# What each kind of model is run on, the same way for the reference and the adapter.
KINDS = {"llama": "lm", "qwen2-tied": "lm", "qwen2-moe": "lm", "bert-st": "st", "tiny-sd": "sd"}


def run(kind: str, model: Any, tokenizer: Any = None) -> Dict[str, Any]:
    """The model's outputs on fixed inputs: logits, embeddings, or a 2-step image."""
    import torch

    with torch.no_grad():
        if kind == "lm":
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            return {"ids": ids, "logits": model(ids).logits}
        if kind == "st":
            return {"embeddings": model.encode(TEXT, convert_to_tensor=True)}
        image = model(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        return {"image": image}


def from_pretrained(kind: str, folder: Path) -> Tuple[Any, Any]:
    """The model (and an LM's tokenizer) loaded the frameworks' usual way, from its folder."""
    if kind == "lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return model, AutoTokenizer.from_pretrained(folder)
    if kind == "st":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(folder), device="cpu"), None
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, None
