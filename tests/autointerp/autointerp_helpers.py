"""Helpers for the autointerp tests: a tiny byte-level LM backend, and features planted on known tokens."""

from __future__ import annotations

import functools

import torch
from conftest import WORDS, tiny_config


@functools.cache
def byte_tokenizer():
    """Every byte is a token (no merges), so any prompt — digits, tabs, brackets — tokenises with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.cache
def byte_backend(batch_size: int = 4):
    """hf_local over a randomly initialised 2-block Llama on bytes (context long enough for the prompts)."""
    from transformers import AutoModelForCausalLM

    from sae.autointerp.backends.hf_local import HFLocalBackend

    config = tiny_config("llama", layers=2, vocab=len(byte_tokenizer()))
    config.max_position_embeddings = 8192
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return HFLocalBackend(model, byte_tokenizer(), "tiny-byte-llama", batch_size=batch_size)


def word_decode(ids):
    return [f" {WORDS[i % len(WORDS)]}" for i in ids]


def planted_codes(n_ctx: int = 24, seq: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [n_ctx, seq, 4]: f0 fires on word 2 ('cat'), f1 on word 3 ('dog') and 4, f2 at random, f3 never."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n_ctx, seq), generator=gen)
    codes = torch.zeros(n_ctx, seq, 4)
    codes[..., 0] = (ids == 2).float() * (1 + torch.rand(n_ctx, seq, generator=gen))
    codes[..., 1] = ((ids == 3) | (ids == 4)).float()
    codes[..., 2] = (torch.rand(n_ctx, seq, generator=gen) < 0.08).float() * torch.rand(n_ctx, seq, generator=gen)
    return codes, ids


class HashLLM:
    """A deterministic stand-in LLM (answers derived from a hash of the prompt), optionally slow.

    Not a mock of any client: a real LLMBackend subclass, used where a test is about the cache and the study's
    plumbing rather than about what a model says.
    """

    def __new__(cls, delay_s: float = 0.0, batch_size: int = 1):
        from sae.autointerp.backends.base import LLMBackend

        class _Hash(LLMBackend):
            name, model = "hash", "hash-v1"

            def __init__(self):
                self.batch_size, self.delay_s, self.calls = batch_size, delay_s, 0

            def _h(self, text: str) -> int:
                import hashlib

                return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)

            def chat(self, requests):
                import math
                import time

                from sae.autointerp.backends.base import ChatResponse

                self.calls += len(requests)
                time.sleep(self.delay_s * len(requests))
                out = []
                for r in requests:
                    h = self._h(repr(r.messages))
                    p = (h % 97 + 1) / 99
                    text = (
                        f"Explanation: words like number {h % 7}" if r.max_tokens > 5 else ("yes" if p > 0.5 else "no")
                    )
                    out.append(
                        ChatResponse(text, {"yes": math.log(p), "no": math.log(1 - p)} if r.top_logprobs else None)
                    )
                return out

            def prompt_logprobs(self, requests):
                import math
                import time

                from sae.autointerp.backends.base import PromptLogprobs

                self.calls += len(requests)
                time.sleep(self.delay_s * len(requests))
                out = []
                for r in requests:
                    offsets = sorted(set(r.positions))
                    tables = [{str(d): math.log(((self._h(f"{r.prompt}{o}{d}") % 50) + 1) / 51 / 11) for d in range(11)}
                              for o in offsets]
                    out.append(PromptLogprobs(tokens=["?"] * len(offsets), offsets=offsets, top=tables))
                return out

            def branch_logprobs(self, requests):
                """One computation per branch request, as an in-process backend makes it."""
                import math

                from sae.autointerp.backends.base import BranchLogprobs

                self.calls += len(requests)
                return [BranchLogprobs([{"0": math.log(((self._h(f"{r.prompt}{p}b") % 50) + 1) / 51)}
                                        for p in r.positions]) for r in requests]

        return _Hash()
