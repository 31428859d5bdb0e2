"""Returns small generated model families (a base plus fine-tunes) for the demo, tests and benchmarks.

Fine-tunes are the base plus a task vector that is sparse-ish and low-rank-ish, like a real one,
so that trimming and sign election have something to do. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a of to and in is it for on with as was at by an be this that from merge model neuron task vector".split()


def _bert_config(hidden: int = 32, layers: int = 2, vocab: int = 64):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
    )


def _llama_config(hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int = 64, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def write_bert_vocab(folder: Path, vocab_size: int) -> None:
    """Writes a WordPiece vocab.txt so the folder loads with AutoTokenizer."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokens += [f"tok{i}" for i in range(vocab_size - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens[:vocab_size]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)


def task_vector_like(param: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """Returns a perturbation: a low-rank part plus heavy-tailed sparse noise, sized relative to `param`."""
    std = float(param.float().std()) if param.numel() > 1 else 1.0
    std = std if std > 0 else 0.02
    noise = torch.randn(param.shape, generator=gen) * (torch.rand(param.shape, generator=gen) < 0.3)
    delta = noise
    if param.dim() == 2:
        rank = 2
        a = torch.randn(param.shape[0], rank, generator=gen)
        b = torch.randn(rank, param.shape[1], generator=gen)
        delta = delta + (a @ b) / rank
    return (delta * std * scale).to(param.dtype)


def build_family(
    root: Path,
    kind: str = "bert",
    n_finetunes: int = 2,
    seed: int = 0,
    classification: bool = False,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
    **config_overrides: int | bool,
) -> tuple[Path, list[Path]]:
    """Returns (base folder, fine-tune folders) of a generated family under `root`.

    kind: `bert` or `llama`. With `classification`, BERT fine-tunes are saved as
    BertForSequenceClassification with a different label count each (task-specific heads).
    """
    from transformers import AutoModel, BertForSequenceClassification, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = _bert_config(**config_overrides)  # type: ignore[arg-type]
        base_model = AutoModel.from_config(cfg)
    elif kind == "llama":
        cfg = _llama_config(**config_overrides)  # type: ignore[arg-type]
        base_model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown model kind {kind!r} (bert or llama)")
    base_model = torch.nn.Module.to(base_model, dtype=dtype)
    base_dir = root / "base"
    base_model.save_pretrained(base_dir)
    if kind == "bert":
        write_bert_vocab(base_dir, cfg.vocab_size)
    fine_tunes = []
    for t in range(n_finetunes):
        gen = torch.Generator().manual_seed(seed * 1000 + t + 1)
        if kind == "bert" and classification:
            cfg_t = _bert_config(**config_overrides)  # type: ignore[arg-type]
            cfg_t.num_labels = 2 + t
            model = torch.nn.Module.to(BertForSequenceClassification(cfg_t), dtype=dtype)
            model.bert.load_state_dict(base_model.state_dict())
            target = model.bert
        else:
            model = torch.nn.Module.to(type(base_model)(cfg), dtype=dtype)
            model.load_state_dict(base_model.state_dict())
            target = model
        with torch.no_grad():
            for _, p in target.named_parameters():
                p.add_(task_vector_like(p, gen, scale))
        out = root / f"finetune_{t}"
        model.save_pretrained(out)
        if kind == "bert":
            write_bert_vocab(out, cfg.vocab_size)
        fine_tunes.append(out)
    return base_dir, fine_tunes
