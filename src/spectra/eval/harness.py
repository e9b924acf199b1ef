"""lm-evaluation-harness adapter: any model `spectra.load` opens, scored exactly as lm-eval's `hf` model scores it.

`SpectraLM` (registered in lm-eval as "spectra") implements the three request types:

- `loglikelihood(context, continuation)` -> (Σ log p(cont_i | ctx, cont_<i), all cont_i greedy). Tokenisation is
  lm-eval's own (`TemplateLM._encode_pair`: trailing context spaces move into the continuation, the pair is encoded
  jointly and split at len(enc(context)); an empty context becomes the prefix token). Requests that share a context
  (every multiple-choice question) are packed into one row per context with a tree attention mask, so the context
  is computed once, and many questions go into one batch (`spectra.eval.scoring.score_groups`); single
  continuations are batched as whole sequences. Sequences longer than max_length + 1 are cut from the left exactly
  as `HFLM` cuts them.
- `loglikelihood_rolling(text)` -> Σ log p over the whole text, in lm-eval's disjoint rolling windows of max_length
  tokens with the prefix (BOS/EOS) token before the first one.
- `generate_until(context, {until, max_gen_toks})` -> greedy continuation with the KV cache, cut at the first stop
  string (EOS always stops).

`_run_tasks` runs lm-eval over named tasks (the task setup of `simple_evaluate`, then `evaluator.evaluate`) for
`spectra.eval.run.evaluate`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  lm-eval registers its own models lazily, only while its registry is empty
    import lm_eval.tasks  # noqa: F401  (`spectra.eval.run` reaches the TaskManager through this module)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # lm-eval is the `eval` extra
    raise ImportError(f"spectra.eval.harness needs lm-eval ({e}); install it with: "
                      "pip install 'spectra-lm[eval]'") from e

from spectra.eval.scoring import score_groups, score_sequences

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


@register_model("spectra")
class SpectraLM(TemplateLM):
    """lm-eval model over a spectra `Transformer`. Construct from a loaded model and a `tokenizers.Tokenizer`, or
    from `pretrained=PATH[,tokenizer=PATH,batch_size=N,device=cpu,dtype=float32]` through lm-eval."""

    def __init__(
        self,
        model: nn.Module | None = None,
        tokenizer=None,
        *,
        pretrained: str | None = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        progress: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:  # lm-eval passes its generic options (max_batch_size, ...) to every model class
            log.debug("SpectraLM ignores %s", sorted(unused))
        if isinstance(dtype, str) and dtype != "auto":
            found = getattr(torch, dtype, None)
            if found not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"SpectraLM dtype={dtype!r}; accepted: auto, float32, float16, bfloat16 (or torch's "
                                 "other names for them: float, half)")
            dtype = found
        elif dtype == "auto":
            dtype = None
        if model is None:
            if pretrained is None:
                raise ValueError("SpectraLM needs a model or pretrained=PATH")
            from spectra.loading import load

            model = load(pretrained, device=device, dtype=dtype)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            from spectra.loading import model_tokenizer

            tokenizer = model_tokenizer(pretrained, tokenizer)
        from spectra.data import check_vocab

        check_vocab(tokenizer, model.config, what="the evaluation tokenizer")  # a larger vocab: not this model's
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._device = self.model.embed_tokens.weight.device
        self._max_length = int(max_length or model.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.progress = bool(progress)
        cfg = model.config
        self._eos, self._bos = cfg.eos_token_id, cfg.bos_token_id
        self._prefix_str = self.tokenizer.decode([self._bos], skip_special_tokens=False)
        self.name = str(pretrained or getattr(cfg, "name", "") or "spectra")

    # ---- lm-eval plumbing -----------------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SpectraLM:
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def get_model_info(self) -> dict:
        weight = self.model.embed_tokens.weight
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(weight.dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Same rule as HFLM: the tokenizer's own special tokens unless told otherwise or the text already starts with
        # the prefix token.
        if add_special_tokens is None:
            add_special_tokens = not (self._prefix_str and string.startswith(self._prefix_str))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- loglikelihood --------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of the requests, its bar drawn only when `progress`."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kw: Any
    ) -> list[tuple[float, bool]]:
        """Group by (left-truncated) context; shared contexts go through the KV cache, the rest as whole sequences."""
        L = self.max_length
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation tokens ({requests[i][0]!r})")
            if len(cont) > L:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={L}")
            whole = (ctx + cont)[-(L + 1) :]  # HFLM's left truncation
            groups[tuple(whole[: len(whole) - len(cont)])].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="spectra loglikelihood",
                    disable=disable_tqdm or not self.progress or len(requests) < 64)
        singles = [idx[0] for idx in groups.values() if len(idx) == 1]
        for start in range(0, len(singles), self.batch_size * 8):
            chunk = singles[start : start + self.batch_size * 8]
            seqs = [(requests[i][1] + requests[i][2])[-(L + 1) :] for i in chunk]
            scores = score_sequences(self.model, seqs, [len(requests[i][2]) for i in chunk], batch_size=self.batch_size)
            for i, (logp, greedy) in zip(chunk, scores):
                results[i] = (float(logp.sum()), bool(greedy.all()))
            pbar.update(len(chunk))
        # Contexts shared by several continuations: packed rows of at most batch_size continuations each (one
        # context can be shared by a whole task: an empty context becomes the prefix token, as in CrowS-Pairs).
        packs = [
            (ctx, idx[start : start + self.batch_size])
            for ctx, idx in groups.items()
            if len(idx) > 1
            for start in range(0, len(idx), self.batch_size)
        ]
        for start in range(0, len(packs), self.batch_size * 8):
            chunk = packs[start : start + self.batch_size * 8]
            scores = score_groups(
                self.model,
                [(list(ctx), [requests[i][2] for i in idx]) for ctx, idx in chunk],
                batch_size=self.batch_size,
            )
            for (_, idx), group_scores in zip(chunk, scores):
                for i, (logp, greedy) in zip(idx, group_scores):
                    results[i] = (float(logp.sum()), bool(greedy.all()))
                pbar.update(len(idx))
        pbar.close()
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        seqs, n_scored, owner = [], [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, pred in map(make_disjoint_window, windows):
                seqs.append(ctx + pred)
                n_scored.append(len(pred))
                owner.append(r)
        totals = [0.0] * len(requests)
        if seqs:
            for r, (logp, _) in zip(owner, score_sequences(self.model, seqs, n_scored, batch_size=self.batch_size)):
                totals[r] += float(logp.sum())
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, context: list[int], max_new: int, until: list[str]) -> list[int]:
        """Greedy tokens after `context` until EOS, a stop string in the decoded text, or `max_new` tokens."""
        model, out = self.model, []
        cache = model.new_cache(1, len(context) + max_new)
        idx = torch.tensor([context], dtype=torch.long, device=self._device)
        for _ in range(max_new):
            h = model(idx, cache=cache, return_hidden=True)[:, -1]  # (1, C)
            nxt = int(model.lm_head(h).argmax(dim=-1))
            out.append(nxt)
            if nxt == self._eos:
                break
            if until and any(s and s in self.tok_decode(out) for s in until):
                break
            idx = torch.tensor([[nxt]], dtype=torch.long, device=self._device)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self._eos], skip_special_tokens=False)
        # A task that sets no max_gen_toks (triviaqa) gets the default, capped at half the context: a 256-token model
        # failed the `paper` preset at triviaqa. A task's own value must fit, as in lm-eval's HFLM.
        default = min(self._max_gen_toks, self.max_length // 2)
        if default < self._max_gen_toks and any("max_gen_toks" not in dict(r.args[1]) for r in requests):
            log.warning("generate_until: max_gen_toks %d capped at %d, half the model's max_length %d",
                        self._max_gen_toks, default, self.max_length)
        res = []
        quiet = disable_tqdm or not self.progress or len(requests) < 16
        for req in tqdm(requests, desc="spectra generate_until", disable=quiet):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), default)
            if kwargs.get("do_sample"):
                raise ValueError(f"generate_until: only greedy decoding is supported, got {gen_kwargs}")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} must be below the model's max_length={self.max_length}")
            ctx = self.tok_encode(context)[-(self.max_length - max_gen) :]
            if not ctx:
                ctx = [self.prefix_token_id]
            text = postprocess_generated_text(self.tok_decode(self.greedy(ctx, max_gen, until)), until, None)
            res.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return res


def _run_tasks(
    lm: SpectraLM, names: list[str], manager, *, limit, num_fewshot: int | None, seed: int
) -> dict[str, Any]:
    """What `lm_eval.simple_evaluate` does for an LM object (task setup, seeds, `evaluator.evaluate`), without its
    environment report, which shells out to pip and git and costs ~15 s per call."""
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with _task_bars(lm.progress):  # loading the tasks prepares their datasets, which draws bars too
        loaded = manager.load(names)
        for task_obj in loaded["tasks"].values():
            default = task_obj.get_config("num_fewshot")
            if num_fewshot is not None and default != 0:
                task_obj.set_config(key="num_fewshot", value=num_fewshot)
            elif num_fewshot is None and default is None:
                task_obj.set_config(key="num_fewshot", value=0)
            task_obj.set_fewshot_seed(seed=seed)
        # the samples carry each document's scores, from which `results.add_stderr` computes the standard errors
        return lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True)


@contextlib.contextmanager
def _task_bars(show: bool) -> Iterator[None]:
    """lm-eval draws a bar per task while it builds the requests, with no option to turn it off (tqdm reads its
    TQDM_DISABLE variable once, at import), and `datasets` one while it prepares a split: with `show` False lm-eval's
    module gets a disabled `tqdm` and `datasets` its bars switched off, both restored after."""
    import datasets.utils.logging as datasets_logging
    import lm_eval.api.task as task_module

    if show:
        yield
        return
    original, datasets_bars = task_module.tqdm, datasets_logging.is_progress_bar_enabled()
    task_module.tqdm = functools.partial(original, disable=True)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        task_module.tqdm = original
        if datasets_bars:
            datasets_logging.enable_progress_bar()
