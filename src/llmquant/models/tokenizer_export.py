"""A model folder's tokenizer as llama.cpp's GGUF vocabulary: tokens, scores, types, merges, special ids, template.

Two kinds, chosen as llama.cpp's converter chooses them: a SentencePiece ``tokenizer.model`` becomes tokenizer
model "llama" (Llama 2, Mistral, Gemma, Phi-3); a byte-level BPE ``tokenizer.json`` becomes "gpt2" with a
``tokenizer.ggml.pre`` naming the pre-tokenizer llama.cpp must use (Llama 3, Qwen, SmolLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from llmquant.errors import InputError
from llmquant.models.bpe_pre_table import CHECK_TEXT, PRE_TOKENIZER_BY_HASH

# tokenizer.json pre-tokenizer regexes → llama.cpp's name for them (the patterns llama-vocab.cpp implements)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT_REGEX = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class VocabExport:
    """What goes under ``tokenizer.ggml.*``: keys for GGUFWriter ``add_<key>`` plus the special-token loader."""

    values: dict[str, Any]
    special: gguf.SpecialVocab
    n_tokens: int
    after_special: dict[str, Any] = field(default_factory=dict)  # overrides llama.cpp applies after SpecialVocab


def export_vocab(folder: Path, vocab_size: int, arch_name: str, add_space_prefix: bool | None = None) -> VocabExport:
    """The tokenizer of ``folder`` for an architecture (our table's ``name``), as llama.cpp's converter writes it."""
    spm_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    config = _tokenizer_config(folder)
    if arch_name == "phi3" and config.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4 (conversion/phi.py)
        export = export_bpe(folder, vocab_size)
    elif spm_file.is_file():
        export = export_sentencepiece(folder, vocab_size)
    elif json_file.is_file():
        export = _export_llama_hf(folder) if arch_name in ("llama", "mistral", "mixtral") else None
        export = export or export_bpe(folder, vocab_size)
    else:
        raise InputError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer "
                         "files into the folder")
    if arch_name in ("llama", "mistral", "mixtral"):
        if config.get("add_prefix_space") is not None:  # as conversion/llama.py LlamaModel.set_vocab
            export.values["add_space_prefix"] = bool(config["add_prefix_space"])
        if vocab_size == 49152:  # conversion/llama.py: llama.cpp's converter turns BOS off for 49152-token vocabs
            export.after_special["add_bos_token"] = False
    if add_space_prefix is not None:
        export.values["add_space_prefix"] = add_space_prefix
    return export


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


# ---- byte-level BPE ------------------------------------------------------------------------------------------


def export_bpe(folder: Path, vocab_size: int) -> VocabExport:
    """gpt2-style vocabulary (convert_hf_to_gguf.py get_vocab_base + _set_vocab_gpt2)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"{folder}: cannot load the tokenizer ({exc})") from None
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"{folder}: the tokenizer has token id {max(vocab.values())}, but config.json says "
                         f"vocab_size={vocab_size}")
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if token in added:
            # llama.cpp expects control and user-defined tokens pre-normalized
            if not added_decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    values = {"tokenizer_model": "gpt2", "tokenizer_pre": identify_pre_tokenizer(tokenizer, folder),
              "token_list": tokens, "token_types": types}
    return VocabExport(values=values, special=gguf.SpecialVocab(folder, load_merges=True), n_tokens=len(tokens))


def looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (convert_hf_to_gguf.py does_token_look_special)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def identify_pre_tokenizer(tokenizer: Any, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer: first by the hash of the check text's tokens, as its converter does;
    for tokenizers llama.cpp has never seen (new or retrained vocabularies), by the pre-tokenizer's own definition."""
    check_hash = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if check_hash in PRE_TOKENIZER_BY_HASH:
        return PRE_TOKENIZER_BY_HASH[check_hash]
    name = pre_tokenizer_from_json(folder / "tokenizer.json")
    if name is None:
        raise InputError(f"{folder / 'tokenizer.json'}: the BPE pre-tokenizer is not one llama.cpp knows "
                         f"(check hash {check_hash}); llama.cpp would tokenize this model differently")
    return name


def pre_tokenizer_from_json(path: Path) -> str | None:
    """Match tokenizer.json's pre_tokenizer against the ones llama-vocab.cpp implements."""
    try:
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, json.JSONDecodeError):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _PRE_BY_SPLIT_REGEX.get((steps[0].get("pattern") or {}).get("Regex", ""))
    return None


# ---- SentencePiece -------------------------------------------------------------------------------------------


def export_sentencepiece(folder: Path, vocab_size: int) -> VocabExport:
    """llama-style vocabulary (convert_hf_to_gguf.py _create_vocab_sentencepiece + _set_vocab_sentencepiece)."""
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a SentencePiece model ({exc})") from None
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i] = processor.IdToPiece(i).encode("utf-8")
        scores[i] = processor.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if processor.IsUnknown(i) else gguf.TokenType.CONTROL
                    if processor.IsControl(i) else gguf.TokenType.UNUSED if processor.IsUnused(i)
                    else gguf.TokenType.BYTE if processor.IsByte(i) else gguf.TokenType.NORMAL)
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        for token, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = token.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    for key, data in _tokenizer_config(folder).get("added_tokens_decoder", {}).items():
        i, token = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")  # user-defined tokens are matched pre-normalized by llama.cpp
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i], tokens[i] = -1000.0, token.encode("utf-8")
    values = {"tokenizer_model": "llama", "tokenizer_pre": "default", "token_list": tokens, "token_scores": scores,
              "token_types": types}
    return VocabExport(values=values, special=gguf.SpecialVocab(folder, n_vocab=len(tokens)), n_tokens=len(tokens))


def _export_llama_hf(folder: Path) -> VocabExport | None:
    """A SentencePiece-style BPE saved only as tokenizer.json (byte fallback): still llama.cpp's "llama" model."""
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError, KeyError):
        return None
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    values = {"tokenizer_model": "llama", "tokenizer_pre": "default", "token_list": tokens, "token_scores": scores,
              "token_types": types}
    return VocabExport(values=values, special=gguf.SpecialVocab(folder, n_vocab=len(tokens)), n_tokens=len(tokens))
