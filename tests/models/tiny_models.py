"""Tiny random models with real tokenizers trained on the built-in text, for the converter's tests.

Each architecture gets a float32 model of two layers and a small vocabulary, saved as a Hugging Face folder
the way real checkpoints are: byte-level BPE (tokenizer.json) for Llama 3 / Qwen, SentencePiece
(tokenizer.model) for Llama 2 / Mistral / Gemma / Phi-3.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llmquant.calibration import builtin_text

SPECIAL_BPE = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
TRAIN_CHARS = 200_000

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              initializer_range=0.15)  # large enough that attention is sharp and a wrong q/k order shows

# arch → (transformers config class, config kwargs, tokenizer kind)
TINY_ARCHS: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", dict(_SMALL, tie_word_embeddings=False), "bpe-llama3"),
    "llama-spm": ("LlamaConfig", dict(_SMALL, tie_word_embeddings=False), "spm-llama"),
    # every head its own value head: AWQ folds o_proj's scales into v_proj's rows only then
    "llama-mha": ("LlamaConfig", dict(_SMALL, num_key_value_heads=4, tie_word_embeddings=False), "bpe-llama3"),
    "mistral": ("MistralConfig", dict(_SMALL, sliding_window=None), "spm-llama"),
    "qwen2": ("Qwen2Config", dict(_SMALL, tie_word_embeddings=True), "bpe-qwen2"),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=32, tie_word_embeddings=True), "bpe-qwen2"),
    "gemma2": ("Gemma2Config", dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
                                    hidden_activation="gelu_pytorch_tanh"), "spm-gemma"),
    "gemma3": ("Gemma3TextConfig", dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6),
               "spm-gemma"),
    "phi3": ("Phi3Config", dict(_SMALL, pad_token_id=0, tie_word_embeddings=False), "spm-llama"),
    "mixtral": ("MixtralConfig", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                "spm-llama"),
    "qwen3-moe": ("Qwen3MoeConfig", dict(_SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, norm_topk_prob=True), "bpe-qwen2"),
}


def train_bpe_tokenizer(target: Path, split_regex: str | None, vocab_size: int = 768):
    """A byte-level BPE tokenizer trained on the built-in text, saved with tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_BPE,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = builtin_text()[:TRAIN_CHARS]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(target)
    return fast


def train_spm_tokenizer(target: Path, flavour: str, vocab_size: int = 512):
    """A SentencePiece BPE model (byte fallback, like Llama 2 / Gemma) trained on the built-in text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    text_file = target / "train.txt"
    text_file.write_text(builtin_text()[:TRAIN_CHARS], encoding="utf-8")
    gemma = flavour == "gemma"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(target / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=not gemma,
        pad_id=0 if gemma else -1, eos_id=1 if gemma else 2, bos_id=2 if gemma else 1, unk_id=3 if gemma else 0,
        minloglevel=2,
        # Phi-3 has it; llama.cpp looks it up in any model whose name says phi3
        user_defined_symbols=[] if gemma else ["<|endoftext|>"],
    )
    text_file.unlink()
    (target / "tokenizer.vocab").unlink()
    # transformers builds its tokenizer from tokenizer.model when tokenizer_config.json names the class
    (target / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer"}), encoding="utf-8")
    model_file = (target / "tokenizer.model").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "tokenizer.model").write_bytes(model_file)  # what llama.cpp's converter reads
    return tokenizer


def build_tiny(arch: str, target: Path, seed: int = 0) -> Path:
    """The tiny ``arch`` model as a Hugging Face folder (cached: returned at once if already built)."""
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_cls, kwargs, tokenizer_kind = TINY_ARCHS[arch]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if tokenizer_kind.startswith("bpe"):
            regex = {"bpe-llama3": LLAMA3_SPLIT, "bpe-qwen2": QWEN2_SPLIT, "bpe-gpt2": None}[tokenizer_kind]
            tokenizer = train_bpe_tokenizer(tmp, regex)
        else:
            tokenizer = train_spm_tokenizer(tmp, tokenizer_kind.removeprefix("spm-"))
        kwargs = dict(kwargs, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        config = getattr(transformers, config_cls)(**kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # random norms, so a missing Gemma +1 or a wrong norm would show in the logits
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(torch.rand_like(param) * 0.5 + (0.0 if "gemma" in arch else 0.75))
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
