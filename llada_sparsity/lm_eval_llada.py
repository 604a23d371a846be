"""lm-eval model for LLaDA with FFN sparsification: ``llada-sparse``.

Scoring tasks go through the official Monte Carlo likelihood estimator, ``generate_until``
through the official denoising loop; both run on a single device (no accelerate launcher).
It takes the same sparsification arguments as ``sparse-hf`` and exposes the same
``set_sparsification`` / ``sparsity_statistics`` interface, so the dense sweep runner and the
critical-sparsity analysis work unchanged (``--model llada-8b-base``). Statistics are pooled
over all forward passes (every Monte Carlo batch and denoising step) of real tokens; with
classifier-free guidance only the conditional half counts.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from common.core.hooks import Sparsifier
from common.evaluation.bridge import SparsificationSettings
from common.core.recorder import SparsityRecorder

from .generation import generate
from .likelihood import log_likelihood
from .modeling import load_llada


@register_model("llada-sparse")
class LLaDALM(SparsificationSettings, LM):
    def __init__(self, pretrained, tokenizer=None, sites=None, rule: str = "topp", value: float = 1.0,
                 power: float = 1.0, layers=None, mc_num: int = 128, batch_size: int = 32, cfg_scale: float = 0.0,
                 steps: int = 64, gen_length: int = 64, block_length: int = 32, dtype: str | None = None,
                 device: str = "cpu", seed: int = 1234, stats_file: str | None = None, **kwargs):
        super().__init__()
        if isinstance(pretrained, str):
            pretrained, loaded_tokenizer = load_llada(pretrained, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("LLaDALM needs a tokenizer: the checkpoint directory has none, pass tokenizer=")
        self.model, self.tokenizer = pretrained, tokenizer
        self.mc_num, self.mc_batch = int(mc_num), min(int(batch_size), int(mc_num))
        self.cfg_scale, self.seed, self.stats_file = float(cfg_scale), int(seed), stats_file
        self.schedule = dict(steps=int(steps), gen_length=int(gen_length), block_length=int(block_length))
        self.recorder = SparsityRecorder()
        self.set_sparsification(sites, rule, value, power, layers)

    def _sparsified(self):
        if not self.sites:
            from contextlib import nullcontext

            return nullcontext()
        return Sparsifier(self.model, self.sites, self.rule, self.value, self.power, self.layers, self.recorder,
                          criterion=self.criterion, calibration=self.calibration)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The official split: trailing spaces of the context move to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_ids = self.tokenizer(context)["input_ids"]
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        torch.manual_seed(self.seed)
        out = []
        with self._sparsified():
            for request in tqdm(requests, disable=disable_tqdm, desc="LLaDA Monte Carlo likelihood"):
                context, continuation = request.args
                prompt, answer = self._encode_pair(context, continuation)
                mc_num = self.mc_batch if len(answer) == 1 else self.mc_num  # one sample suffices (official)
                value = log_likelihood(self.model, torch.tensor(prompt), torch.tensor(answer), mc_num=mc_num,
                                       batch_size=min(self.mc_batch, mc_num), cfg_scale=self.cfg_scale,
                                       recorder=self.recorder)
                out.append((value, False))
        self._write_stats()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("LLaDA has no left-to-right likelihood: perplexity tasks are not supported; "
                                  "use multiple-choice or generation tasks")

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        device = next(self.model.parameters()).device
        with self._sparsified():
            for request in tqdm(requests, disable=disable_tqdm, desc="LLaDA generation"):
                context, settings = request.args
                prompt = torch.tensor([self.tokenizer(context)["input_ids"]], device=device)
                tokens = generate(self.model, prompt, recorder=self.recorder, **self.schedule)
                text = self.tokenizer.decode(tokens[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)
                for stop in settings.get("until", []) or []:
                    text = text.split(stop)[0]
                out.append(text)
        self._write_stats()
        return out
