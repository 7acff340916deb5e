"""Tiny stand-ins for hub models, saved with save_pretrained: what the paper envs' tests load.

The paper envs (imdb, tldr) load gpt2-large, a RoBERTa sentiment classifier, reward models and
datasets from the Hugging Face hub; tests point the same loading code at these local directories.
The tokenizer is a byte-level BPE trained on the test's own texts (so any text encodes), wrapped
as a transformers fast tokenizer, like GPT-2's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def save_tiny_gpt2(path: Path, texts: list[str], *, seed: int = 0) -> Path:
    """A 1-layer GPT-2 (untrained) and its tokenizer, as `from_pretrained(path)` reads them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_bpe_tokenizer(texts)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def save_tiny_classifier(path: Path, texts: list[str], *, id2label: dict[int, str], seed: int = 0) -> Path:
    """A 1-layer RoBERTa sequence classifier (untrained) with `id2label`, e.g. {0: "NEGATIVE", 1: "POSITIVE"};
    one label makes a scalar reward model (num_labels=1), as hub reward models are."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = byte_bpe_tokenizer(texts)
    tokenizer.pad_token = tokenizer.eos_token
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=300, num_labels=len(id2label),
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_dataset(root: Path, columns: list[str], splits: dict[str, dict[str, list[str]]]) -> str:
    """A parquet dataset folder laid out like the CarperAI hub repos: data/{split}-00000-of-00001-<hash>.parquet
    and a README whose YAML header has the card's dataset_info (which load_dataset checks the files against)."""
    (root / "data").mkdir(parents=True)
    for k, (split, table) in enumerate(splits.items()):
        pd.DataFrame(table).to_parquet(root / "data" / f"{split}-00000-of-00001-{k:016x}.parquet", index=False)
    features = "".join(f"  - name: {c}\n    dtype: string\n" for c in columns)
    (root / "README.md").write_text(f"---\ndataset_info:\n  features:\n{features}---\n")
    return str(root)
