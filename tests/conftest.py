"""Shared fixtures: tiny models built in-process (no hub), small data files written per test."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = ["good", "great", "fine", "happy", "excellent", "bad", "awful", "poor", "sad", "terrible", "the", "a", "movie", "film", "was", "is", "very", "quite", "john", "mary", "paris", "london", "acme", "corp", "visited", "works", "at", "in", "and", "of", "to"]
POSITIVE = {"good", "great", "fine", "happy", "excellent"}


def write_vocab(path: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", ".", ","]
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = BertTokenizerFast(vocab_file=str(write_vocab(folder / "vocab.txt")), do_lower_case=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    # Save the body only (as a pretrained encoder ships): heads are created per task.
    BertForSequenceClassification(cfg).bert.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0)


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Learnable toy sentiment: the label is whether the sentence holds a positive word."""
    rng = random.Random(seed)
    pos, neg = sorted(POSITIVE), ["bad", "awful", "poor", "sad", "terrible"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(pos if label == "pos" else neg)
        rows.append((f"the movie was very {word}", label))
    return rows


def ner_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    people, places, orgs = ["john", "mary"], ["paris", "london"], ["acme"]
    out = []
    for _ in range(n):
        p, c = rng.choice(people), rng.choice(places)
        if rng.random() < 0.5:
            out.append(([p, "visited", c], ["B-PER", "O", "B-LOC"]))
        else:
            out.append(([p, "works", "at", orgs[0], "corp"], ["B-PER", "O", "O", "B-ORG", "I-ORG"]))
    return out


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    path = tmp_path / "sentiment.csv"
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in sentiment_rows(64)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def ner_conll(tmp_path) -> Path:
    path = tmp_path / "ner.txt"
    blocks = ["-DOCSTART- -X- -X- O\n"]
    for toks, tags in ner_sentences(48):
        blocks.append("\n".join(f"{w} X X {t}" for w, t in zip(toks, tags, strict=False)) + "\n")
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


CHAT_WORDS = ("hi hello how can i help you cancel my order please your is done thanks bye refund the a "
              "summarise translate this text short cat sat on mat le chat").split()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a word-level tokenizer that has ChatML special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate([*specials, "system", "user", "assistant", "\n", *CHAT_WORDS, ".", ",", "?", "!"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>"])
    from core.tasks import CHATML

    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
