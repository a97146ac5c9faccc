"""Any Hugging Face causal LM in-process: a hub id, a directory, or a .gguf file; batched, exact log-probs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from sae.autointerp.backends.base import (
    BranchLogprobs,
    BranchRequest,
    ChatRequest,
    ChatResponse,
    LLMBackend,
    LogprobRequest,
    PromptLogprobs,
    add_logprob,
)
from sae.autointerp.prompts import render_plain
from sae.errors import ConfigError


def resolve_model(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) for from_pretrained: a .gguf file, a directory holding exactly one, or as given."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"explainer.model={spec}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file:
            return str(path), gguf_file
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise ConfigError(f"explainer.model={spec} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): "
                              f"name one with explainer.gguf_file=")
        return str(path), ggufs[0] if ggufs else None
    if spec.startswith((".", "/", "~")):
        raise ConfigError(f"explainer.model={spec}: no such file or directory")
    return spec, gguf_file  # a hub id


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware runs it fast (CUDA; CPUs with AMX or AVX512-BF16, where it is ~2.7x
    faster than float32 for a 135M model here), else float32; any other value is a torch dtype name."""
    if dtype != "auto":
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ConfigError(f"explainer.dtype={dtype}: expected auto, float32, bfloat16 or float16")
        return getattr(torch, dtype)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        fast = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # private helpers: absent in some torch builds
        fast = False
    return torch.bfloat16 if fast else torch.float32


class HFLocalBackend(LLMBackend):
    """Greedy batched generation with the model's chat template; exact prompt log-probs from one forward."""

    name = "hf_local"

    def __init__(self, model, tokenizer, model_name: str, batch_size: int = 8, device: str | torch.device = "cpu",
                 chat_template_kwargs: dict | None = None):
        self.lm, self.tok = model.eval(), tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.model, self.batch_size, self.device = model_name, max(1, batch_size), torch.device(device)
        self.lm.to(self.device)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self._vocab: list[str] | None = None
        self._candidates: dict[tuple[str, ...], list[int]] = {}  # candidate strings -> token ids, found once
        self._fast_head = self._check_fast_head()

    @classmethod
    def load(cls, model: str, gguf_file: str | None = None, batch_size: int = 8, device: str = "cpu",
             dtype: str = "auto", chat_template_kwargs: dict | None = None) -> HFLocalBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name_or_path, gguf = resolve_model(model, gguf_file)
        want = resolve_dtype(dtype, device)
        kwargs = {"gguf_file": gguf} if gguf else {}
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            # GGUF: dequantised to float32 first (the path transformers recommends), then cast
            lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32 if gguf else want, **kwargs)
            lm = lm.to(want)
        except (OSError, ValueError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"explainer.model={model}: cannot load it ({first})") from err
        label = f"{Path(name_or_path).name}/{gguf}" if gguf else Path(name_or_path).name or name_or_path
        return cls(lm, tok, label, batch_size=batch_size, device=device, chat_template_kwargs=chat_template_kwargs)

    def _check_fast_head(self) -> bool:
        """Whether output_embeddings(base_model(x)) reproduces the logits, so only wanted positions hit the head."""
        ids = torch.tensor([[self.tok.pad_token_id or 0] * 4], device=self.device)
        try:
            with torch.no_grad():
                full = self.lm(input_ids=ids).logits
                fast = self.lm.get_output_embeddings()(self.lm.base_model(input_ids=ids).last_hidden_state)
            return bool(torch.allclose(full, fast, atol=1e-4, rtol=1e-4))
        except (AttributeError, TypeError, RuntimeError):
            return False

    @property
    def cache_tag(self) -> str:
        return self.name + (f"+{sorted(self.chat_template_kwargs.items())}" if self.chat_template_kwargs else "")

    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.lm.parameters())
        return {"backend": self.name, "model": self.model, "endpoint": None, "n_params": n_params,
                "dtype": str(next(self.lm.parameters()).dtype).removeprefix("torch."),
                "params": f"{n_params / 1e6:.0f}M" if n_params < 1e9 else f"{n_params / 1e9:.1f}B"}

    # -- chat -----------------------------------------------------------------------------------------------------
    def _render(self, messages: Sequence[tuple[str, str]]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                add_generation_prompt=True, tokenize=False,
                                                **self.chat_template_kwargs)
        return render_plain(tuple(messages))

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        out: list[ChatResponse | None] = [None] * len(requests)
        encoded = [self.tok(self._render(r.messages) + r.prefix, add_special_tokens=False).input_ids for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            part = order[start: start + self.batch_size]
            for i, resp in zip(part, self._generate([encoded[i] for i in part], [requests[i] for i in part])):
                out[i] = resp
        return out  # type: ignore[return-value]

    def complete(self, prompts: Sequence[str], max_tokens: int, temperature: float = 0.0) -> list[str]:
        """Raw continuations of plain-text prompts (no chat template), for the OpenAI-compatible test server."""
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            part = list(prompts[start: start + self.batch_size])
            reqs = [ChatRequest((), max_tokens, temperature) for _ in part]
            out += [r.text for r in self._generate([self.tok(p).input_ids for p in part], reqs)]
        return out

    def _generate(self, encoded: list[list[int]], requests: list[ChatRequest]) -> list[ChatResponse]:
        from transformers import GenerationConfig

        width = max(map(len, encoded))
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        temperature = max(r.temperature for r in requests)
        config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=temperature > 0,
                                  temperature=temperature if temperature > 0 else None, pad_token_id=pad,
                                  eos_token_id=self.lm.generation_config.eos_token_id or self.tok.eos_token_id,
                                  output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            gen = self.lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        first = torch.log_softmax(gen.logits[0].float(), -1)
        responses = []
        for b, req in enumerate(requests):
            new = gen.sequences[b, width: width + req.max_tokens]
            text = req.prefix + self.tok.decode(new, skip_special_tokens=True)
            table = (
                self._table(first[b], req.top_logprobs, req.candidates) if req.top_logprobs or req.candidates else None
            )
            responses.append(ChatResponse(text=text, first_logprobs=table))
        return responses

    # -- log-probs ------------------------------------------------------------------------------------------------
    def _vocab_strings(self) -> list[str]:
        if self._vocab is None:
            self._vocab = [self.tok.decode([i]) for i in range(len(self.tok))]
        return self._vocab

    def _candidate_ids(self, candidates: Sequence[str]) -> list[int]:
        """Every token id whose text, stripped and lower-cased, is one of the candidates (one vocabulary scan per
        candidate set, then remembered: a set of prompts shares it)."""
        key = tuple(candidates)
        if key not in self._candidates:
            wanted = {c.strip().lower() for c in candidates}
            self._candidates[key] = [i for i, s in enumerate(self._vocab_strings()) if s.strip().lower() in wanted]
        return self._candidates[key]

    def _table(self, logprobs: torch.Tensor, top: int, candidates: Sequence[str]) -> dict[str, float]:
        """The top-`top` entries plus every candidate token, keyed by token text (duplicates merged)."""
        vocab = self._vocab_strings()
        ids = set(torch.topk(logprobs, min(top, logprobs.numel())).indices.tolist()) if top else set()
        ids.update(self._candidate_ids(candidates) if candidates else [])
        table: dict[str, float] = {}
        for i in sorted(ids):
            if i < len(vocab) and math.isfinite(float(logprobs[i])):
                add_logprob(table, vocab[i], float(logprobs[i]))
        return table

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, return_offsets_mapping=True)
            return list(enc.input_ids), [start for start, _ in enc.offset_mapping]
        ids = self.tok(text).input_ids
        offsets, pos = [], 0
        for i in range(len(ids)):  # slow tokenizers: offsets from decoded prefixes
            offsets.append(pos)
            pos = len(self.tok.decode(ids[: i + 1], skip_special_tokens=True))
        return ids, offsets

    def prompt_logprobs(self, requests: Sequence[LogprobRequest]) -> list[PromptLogprobs]:
        """One forward per batch of prompts. A request's ``branch`` is folded into the same forward: its tokens are
        appended to the prompt once per position, each attending to the prompt before its position and to itself
        only, so P(next | prompt[:p] + branch) costs the branch's tokens, not a second read of the prompt."""
        out: list[PromptLogprobs] = []
        encoded = [self._encode_with_offsets(r.prompt) for r in requests]
        for start in range(0, len(requests), self.batch_size):
            part = list(range(start, min(start + self.batch_size, len(requests))))
            enc, reqs = [encoded[i] for i in part], [requests[i] for i in part]
            folded = self.folds_branches and any(r.branch for r in reqs)
            out += self._score_folded(enc, reqs) if folded else self._score(enc, reqs)
        return out

    @property
    def folds_branches(self) -> bool:  # the 4-D mask path reads the head at chosen positions only
        return self._fast_head

    def _score(
        self, encoded: list[tuple[list[int], list[int]]], requests: list[LogprobRequest]
    ) -> list[PromptLogprobs]:
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id
        ids = torch.tensor([e + [pad] * (width - len(e)) for e, _ in encoded], device=self.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e, _ in encoded], device=self.device)
        with torch.no_grad():
            if self._fast_head:
                hidden = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                head = lambda b, rows: self.lm.get_output_embeddings()(hidden[b, rows])  # noqa: E731
            else:
                logits_all = self.lm(input_ids=ids, attention_mask=mask).logits
                head = lambda b, rows: logits_all[b, rows]  # noqa: E731
            return [self._prompt_result(tok_ids, offsets, req, lambda rows, b=b: head(b, rows))
                    for b, ((tok_ids, offsets), req) in enumerate(zip(encoded, requests))]

    def _score_folded(
        self, encoded: list[tuple[list[int], list[int]]], requests: list[LogprobRequest]
    ) -> list[PromptLogprobs]:
        layouts = [(ids, self._branch_tokens(req.prompt, offsets, req.positions, req.branch) if req.branch else [])
                   for (ids, offsets), req in zip(encoded, requests)]
        with torch.no_grad():
            hidden, reads = self._masked_forward(layouts)
            results = []
            for b, ((tok_ids, offsets), req) in enumerate(zip(encoded, requests)):
                result = self._prompt_result(tok_ids, offsets, req,
                                             lambda rows, b=b: self.lm.get_output_embeddings()(hidden[b, rows]))
                if req.branch:
                    result.branch_tables = self._branch_tables(hidden[b, reads[b]], req.top_logprobs, req.candidates)
                results.append(result)
        return results

    def _prompt_result(self, tok_ids: list[int], offsets: list[int], req: LogprobRequest, head) -> PromptLogprobs:
        """The tables at the request's positions; ``head(rows)`` gives the logits after the prompt's token rows."""
        result = PromptLogprobs(tokens=self._token_texts(req.prompt, offsets), offsets=offsets,
                                top=[None] * len(tok_ids), token_logprobs=[None] * len(tok_ids))
        wanted = sorted({i for i in (self._index(offsets, p) for p in req.positions) if i >= 1})
        if wanted:
            lp = torch.log_softmax(head(torch.tensor([i - 1 for i in wanted], device=self.device)).float(), -1)
            for row, i in enumerate(wanted):
                result.top[i] = self._table(lp[row], req.top_logprobs, req.candidates)
                result.token_logprobs[i] = float(lp[row, tok_ids[i]])
        return result

    def _branch_tables(self, hidden: torch.Tensor, top: int, candidates: Sequence[str]) -> list[dict[str, float]]:
        lp = torch.log_softmax(self.lm.get_output_embeddings()(hidden).float(), -1)
        return [self._table(row, top, candidates) for row in lp]

    def branch_logprobs(self, requests: Sequence[BranchRequest]) -> list[BranchLogprobs]:
        """Every branch of a request in one forward (as ``prompt_logprobs`` folds them), the prompt's own positions
        not read: the result equals a forward of ``prompt[:p] + text`` per position at the cost of one prompt."""
        if not self._fast_head:
            return super().branch_logprobs(requests)
        out: list[BranchLogprobs] = []
        for start in range(0, len(requests), self.batch_size):
            part = list(requests[start: start + self.batch_size])
            layouts = [self._branch_layout(r) for r in part]
            with torch.no_grad():
                hidden, reads = self._masked_forward(layouts)
                out += [BranchLogprobs(self._branch_tables(hidden[b, reads[b]], r.top_logprobs, r.candidates))
                        for b, r in enumerate(part)]
        return out

    def _branch_layout(self, req: BranchRequest) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """(prompt ids, per position (prefix length in tokens, the branch's token ids))."""
        ids, offsets = self._encode_with_offsets(req.prompt)
        return ids, self._branch_tokens(req.prompt, offsets, req.positions, req.text)

    def _branch_tokens(self, prompt: str, offsets: list[int], positions: Sequence[int],
                       text: str) -> list[tuple[int, list[int]]]:
        """Per position p: (the tokens of the prompt before p's token, the ids of ``prompt[token start:p] + text``)."""
        branches, known = [], {}
        for p in positions:
            i = max(0, self._index(offsets, p))
            extra = prompt[offsets[i]: p] + text if i < len(offsets) else text
            if extra not in known:
                known[extra] = self.tok(extra, add_special_tokens=False).input_ids
            branches.append((i, known[extra]))
        return branches

    def _masked_forward(
        self, layouts: list[tuple[list[int], list[tuple[int, list[int]]]]]
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """Hidden states of each prompt followed by its branches (a 4-D attention mask: the prompt causal, each
        branch attending to its prefix and itself), and per prompt the row of each branch's last token."""
        lengths = [len(ids) + sum(len(b) for _, b in br) for ids, br in layouts]
        width, dtype = max(lengths), next(self.lm.parameters()).dtype
        seqs = torch.full((len(layouts), width), self.tok.pad_token_id, dtype=torch.long)
        pos = torch.zeros(len(layouts), width, dtype=torch.long)
        allow = torch.eye(width, dtype=torch.bool).repeat(len(layouts), 1, 1)  # padding sees itself only
        reads: list[list[int]] = []
        for b, (ids, branches) in enumerate(layouts):
            n = len(ids)
            seqs[b, :n], pos[b, :n] = torch.tensor(ids), torch.arange(n)
            allow[b, :n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            at, last = n, []
            for prefix, toks in branches:
                k = len(toks)
                seqs[b, at: at + k] = torch.tensor(toks)
                pos[b, at: at + k] = torch.arange(prefix, prefix + k)
                allow[b, at: at + k, :prefix] = True
                allow[b, at: at + k, at: at + k] = torch.tril(torch.ones(k, k, dtype=torch.bool))
                at += k
                last.append(at - 1)
            reads.append(last)
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)[:, None]
        hidden = self.lm.base_model(input_ids=seqs.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device)).last_hidden_state
        return hidden, reads

    @staticmethod
    def _index(offsets: list[int], position: int) -> int:
        import bisect

        return bisect.bisect_right(offsets, position) - 1

    @staticmethod
    def _token_texts(text: str, offsets: list[int]) -> list[str]:
        ends = offsets[1:] + [len(text)]
        return [text[a:b] for a, b in zip(offsets, ends)]
