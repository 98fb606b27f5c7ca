"""Text generation for the endpoint: the base model with its named LoRA adapters, many requests per `generate` call.

No Ray and no HTTP here: the Serve deployment (app.py) and the benchmark (bench/serve.py) call `Generator.generate`
the same way.

    gen = Generator(recipe)
    job = Job(prompt_ids=gen.encode("Once upon a time"), model=gen.models[0], max_tokens=16)
    [done] = gen.generate([job])        # done.text, done.finish_reason, done.completion_tokens

One `generate` call serves requests for different adapters together: PEFT's mixed-adapter batches
(`adapter_names=[...]`) route each row through its own adapter, "__base__" through none (a call for a single model
takes PEFT's plain, faster path instead). Rows are grouped only by
what `model.generate` takes once per call (sampling settings, beams, seed); each row still gets its own length limit
and stop sequences from `RowWatcher`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ftlib.data.formats import SYSTEM_NO_INPUT_PROMPT, TEMPLATES, chat_renderer
from ftlib.model import load_for_inference, load_tokenizer
from ftlib.rundir import RunDir

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    """The settings `model.generate` takes once per call. temperature 0 means greedy (the rest is then unused)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_beams: int = 1
    seed: Optional[int] = None

    def key(self) -> tuple:
        if self.temperature == 0:
            return (0.0, 1.0, 0, self.num_beams, None)  # greedy: sampling settings and seed change nothing
        return (self.temperature, self.top_p, self.top_k, self.num_beams, self.seed)


@dataclass
class Job:
    """One prompt to complete."""
    prompt_ids: List[int]
    model: str  # a served model name: an adapter, or the base model's name
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: List[str] = field(default_factory=list)
    # Streaming: called with each new piece of text as it is generated (from the generating thread). The pieces
    # always add up to a prefix of the final `Completion.text`; the caller sends the rest when the job is done.
    on_text: Optional[Callable[[str], None]] = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


def served_adapters(recipe) -> Dict[str, str]:
    """{served name: adapter directory}: the run's own adapter first (as `serve.model_name` or the run's name),
    then `serve.adapters`. The run's adapter may be missing only when other adapters are listed."""
    run = RunDir.of(recipe)
    own = run.adapter
    adapters = {}
    if run.training_done:
        adapters[recipe.served_model_name] = str(own)
    elif not recipe.serve.adapters:
        raise FileNotFoundError(f"no trained adapter in {own} (train the run first, or list adapters to serve "
                                f"in serve.adapters)")
    for name, path in recipe.serve.adapters.items():
        if name in adapters:
            raise ValueError(f"serve.adapters.{name}: the name is already the run's own adapter (serve.model_name)")
        adapters[name] = path
    return adapters


def base_model_name(recipe) -> str:
    """What clients call the bare base model: a hub name as it is, a local model by its directory name."""
    path = recipe.model.name_or_path
    return Path(path).name if os.path.isabs(path) else path


class Prompts:
    """What the ingress needs of the model whatever the engine: the served names, the tokenizer, the context length
    and how a conversation becomes a prompt. No weights are loaded."""

    def __init__(self, recipe):
        from transformers import AutoConfig

        self.tokenizer = load_tokenizer(recipe)
        self.adapters = served_adapters(recipe)
        self.base_name = base_model_name(recipe)
        if self.base_name in self.adapters:
            raise ValueError(f"adapter name {self.base_name!r} is also the base model's name; rename the adapter")
        self.models = [*self.adapters, self.base_name]  # the default (the run's adapter) first
        config = AutoConfig.from_pretrained(recipe.model.name_or_path,
                                            trust_remote_code=recipe.model.trust_remote_code)
        self.context_length = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.prompt_style = recipe.data.prompt_style
        templated = recipe.data.chat_template or any(s.format == "messages" for s in recipe.data.sources)
        self.render_chat = chat_renderer(self.tokenizer, recipe.data.chat_template) if templated else None

    def add(self, name: str, path: str) -> None:
        """Serve one more adapter (the base model's name stays last)."""
        self.adapters[name] = path
        self.models.insert(len(self.models) - 1, name)

    # ------------------------------------------------------------------------------------------- prompts
    def encode(self, text: str) -> List[int]:
        """Token ids of a prompt, with the tokenizer's special tokens (the BOS of LLaMA)."""
        return self.tokenizer(text)["input_ids"]

    def encode_chat(self, messages: List[dict]) -> List[int]:
        """Token ids of a conversation, ready for the assistant's answer, formatted as the run's training data was:
        with the chat template of training (data.chat_template, else the tokenizer's, else ftlib's default) when it
        trained on `messages` rows or sets data.chat_template; otherwise in the notebook's Alpaca style
        (data.prompt_style), which is what an adapter trained on Alpaca rows knows."""
        if self.render_chat is not None:
            return self.tokenizer(self.render_chat(messages, True), add_special_tokens=False)["input_ids"]
        return self.encode(alpaca_conversation(messages, self.prompt_style))


class Generator(Prompts):
    """Prompts, plus the model in this process (HF `generate`, PEFT for the adapters)."""

    def __init__(self, recipe):
        super().__init__(recipe)
        # PEFT names adapters as torch modules (no "."); clients use the served names (a sweep's trials are
        # `learning_rate=0.003,r=8`), so each adapter is loaded under a name of its own.
        self.peft_names = {name: f"adapter_{k}" for k, name in enumerate(self.adapters)}
        self.model = load_for_inference(recipe, {self.peft_names[n]: path for n, path in self.adapters.items()})
        self.device = next(self.model.parameters()).device
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}

    def add(self, name: str, path: str) -> None:
        """Load one more adapter into the PEFT model. Call between generate calls (never during one)."""
        self.peft_names[name] = f"adapter_{len(self.peft_names)}"
        self.model.load_adapter(path, adapter_name=self.peft_names[name])
        super().add(name, path)

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, jobs: List[Job]) -> List[Completion]:
        """Complete every job; one `model.generate` call per distinct sampling setting."""
        groups: Dict[tuple, List[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.sampling.key(), []).append(i)
        done: List[Optional[Completion]] = [None] * len(jobs)
        for rows in groups.values():
            for i, completion in zip(rows, self._generate_together([jobs[i] for i in rows])):
                done[i] = completion
        return done

    @torch.inference_mode()
    def _generate_together(self, jobs: List[Job]) -> List[Completion]:
        batch = self.tokenizer.pad({"input_ids": [j.prompt_ids for j in jobs]}, padding_side="left",
                                   return_tensors="pt").to(self.device)
        prompt_len = batch["input_ids"].shape[1]
        s = jobs[0].sampling
        kwargs = dict(max_new_tokens=max(j.max_tokens for j in jobs), num_beams=s.num_beams,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        models = {j.model for j in jobs}
        if len(models) > 1:
            kwargs["adapter_names"] = [BASE if j.model == self.base_name else self.peft_names[j.model] for j in jobs]
        if s.num_beams == 1:
            # Beam search reorders its rows every step, so per-row limits and streaming work only without beams;
            # with beams every row runs to the longest max_tokens and is cut afterwards.
            kwargs["stopping_criteria"] = StoppingCriteriaList([RowWatcher(self, jobs, prompt_len)])
        if s.seed is not None and s.temperature > 0:
            torch.manual_seed(s.seed)  # reproducible for the same batch; concurrent requests change the batch
        with self._only(models.pop()) if len(models) == 1 else contextlib.nullcontext():
            out = self.model.generate(**batch, **kwargs)
        completions = []
        for job, row in zip(jobs, out[:, prompt_len:].tolist()):
            text, reason, n = self.finish(row, job)
            completions.append(Completion(text, reason or "length", len(job.prompt_ids), n))
        return completions

    def _only(self, model: str):
        """One model for the whole call: PEFT's plain path, ~1.5x faster here than its mixed-batch one."""
        if model == self.base_name:
            return self.model.disable_adapter()
        self.model.set_adapter(self.peft_names[model])
        return contextlib.nullcontext()

    def finish(self, new_ids: List[int], job: Job):
        """(text, finish reason or None while the row may go on, tokens used) of a row's generated tokens."""
        ids = new_ids[:job.max_tokens]
        reason = "length" if len(ids) >= job.max_tokens else None
        for k, token in enumerate(ids):
            if token in self.eos_ids:
                ids, reason = ids[:k], "stop"
                break
        text = self.decode_after(job.prompt_ids, ids)
        cuts = [text.find(s) for s in job.stop if s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        return text, reason, len(ids)


    def decode_after(self, prompt_ids: List[int], ids: List[int]) -> str:
        """The text of `ids` as it continues the prompt. Decoded alone, a sentencepiece tokenizer drops the first
        token's leading space ("Once upon a time" + "Bor" instead of " Bor"); decoded after the prompt's last tokens
        it keeps it, as vLLM's incremental detokenizer does, so both engines give the same text."""
        context = prompt_ids[-CONTEXT_TOKENS:]
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        whole = self.tokenizer.decode(context + ids, skip_special_tokens=True)
        return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(ids, skip_special_tokens=True)


CONTEXT_TOKENS = 4  # prompt tokens decoded before the new ones (decode_after)


class RowWatcher(StoppingCriteria):
    """Called by `generate` after every step: ends each row at its own max_tokens, end of text or stop sequence
    (the call's own limit is the longest max_tokens), and streams new text to the jobs that asked for it."""

    def __init__(self, generator: Generator, jobs: List[Job], prompt_len: int):
        self.generator, self.jobs, self.prompt_len = generator, jobs, prompt_len
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for r, job in enumerate(self.jobs):
            if self.done[r]:
                continue
            if not (job.stop or job.on_text):  # no text needed: only the length and the end-of-text token
                self.done[r] = generated >= job.max_tokens or last[r] in self.generator.eos_ids
                continue
            text, reason, _ = self.generator.finish(input_ids[r, self.prompt_len:].tolist(), job)
            self.done[r] = reason is not None
            if job.on_text and not self.done[r]:  # the final piece comes with the Completion
                safe = _streamable(text, job.stop)
                if len(safe) > len(self.sent[r]):
                    job.on_text(safe[len(self.sent[r]):])
                    self.sent[r] = safe
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _streamable(text: str, stops: List[str]) -> str:
    """The part of unfinished text that can be sent already: not a half-decoded character, and not a tail that
    may turn out to be the start of a stop sequence."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[:len(text) - hold]


def alpaca_conversation(messages: List[dict], style: str) -> str:
    """A conversation in the notebook's Alpaca style. One user message gives exactly the training prompt
    (`alpaca_prompt`); beyond that (the notebook has no multi-turn format): a system message replaces the preamble,
    each user turn is an instruction and each assistant turn the response that follows it."""
    preamble = SYSTEM_NO_INPUT_PROMPT
    turn = TEMPLATES[style]["no_input"][len(preamble):]  # "### Instruction:\n{instruction}\n\n### Response:\n"
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    text = "\n".join(system) + "\n\n" if system else preamble
    for m in messages:
        if m["role"] == "user":
            text += turn.replace("{instruction}", m["content"])
        elif m["role"] == "assistant":
            text += m["content"] + ("\n\n" if style == "instruct" else "\n")
    return text
