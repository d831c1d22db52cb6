"""Tiny models shared by the tests: odd sizes so shards are uneven and ranges straddle rows."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 257


def tiny_llama_config(**overrides) -> LlamaConfig:
    config = dict(
        hidden_size=48, intermediate_size=130, vocab_size=VOCAB, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**config, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def batches(steps: int, batch_size: int, seq_len: int = 16, seed: int = 1, vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g) for _ in range(steps)]


class NarrowNet(nn.Module):
    """Every role, plus a matrix with 2 rows (fewer rows than ranks) and one with 2 columns."""

    def __init__(self, vocab: int = 11, hidden: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.narrow = nn.Linear(hidden, 2)
        self.wide = nn.Linear(2, hidden)  # with a bias: a 1-D parameter
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.wide(torch.tanh(self.narrow(h)))
        return self.head(self.norm(h))

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def narrow_net(seed: int = 0) -> NarrowNet:
    torch.manual_seed(seed)
    return NarrowNet()
