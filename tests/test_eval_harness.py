"""Our lm-eval adapter against lm-eval's own `hf` model on the same exported Llama directory, offline.

Each request type has a tiny local task in a real task schema (the installed YAML is included and only the data
source is swapped): ARC-style multiple choice (shared contexts), LAMBADA (single loglikelihood), WinoGrande (shared
continuations), wikitext (loglikelihood_rolling over several windows) and TriviaQA (generate_until).
"""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from spectra.checkpoint import save_model  # noqa: E402
from spectra.data import train_bpe  # noqa: E402
from spectra.loading import load  # noqa: E402
from spectra.model import build_model  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

TEXT = (
    "The old man walked to the harbour every morning to watch the boats come in. "
    "His daughter said the sea had taken enough from the family, but he only smiled and kept walking. "
    "One day a small red boat arrived with a letter for him, and he read it twice before folding it away. "
    "Question: What colour was the boat? Answer: red. The harbour master laughed, because the letter was his own. "
)
TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"


def corpus(n: int = 40) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[i % len(words) :] + words[: i % len(words)]) for i in range(n)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random FloatLM saved as a spectra directory and exported as a Hugging Face Llama directory."""
    from spectra.interop.hf import export_hf

    root = tmp_path_factory.mktemp("eval_model")
    tok = train_bpe(corpus(), 300, root / "tokenizer.json", min_frequency=1)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=320, max_seq_len=64, init_std=0.2)
    model = build_model(cfg, seed=0)
    spectra_dir = save_model(model, root / "spectra", tokenizer=tok)
    hf_dir = export_hf(model, root / "hf", dtype=torch.float32, tokenizer=tok)
    return spectra_dir, hf_dir


def write_task(root: Path, name: str, include: str, rows: list[dict], split: str, **overrides) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = {"training_split": None, "validation_split": None, "test_split": None, f"{split}_split": split}
    cfg = {
        "include": str(TASKS_DIR / include),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data)}},
        **splits,
        **overrides,
    }
    (root / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    sents = [s.strip() for s in TEXT.split(".") if s.strip()]
    arc = [
        {
            "id": f"q{i}",
            "question": f"{sents[i % len(sents)]}?",
            "choices": {"text": [sents[(i + j) % len(sents)][:30] for j in range(4)], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(10)
    ]
    write_task(root, "toy_arc", "arc/arc_easy.yaml", arc, "test")
    lambada = [{"text": " ".join(TEXT.split()[i : i + 12 + i % 7])} for i in range(12)]
    write_task(root, "toy_lambada", "lambada/lambada_openai.yaml", lambada, "test")
    wino = [
        {"sentence": f"The man gave the letter to _ because {w} was kind.", "option1": "the daughter",
         "option2": "the master", "answer": str(1 + i % 2)}
        for i, w in enumerate(["she", "he", "they", "it", "the sea", "one"])
    ]
    write_task(root, "toy_winogrande", "winogrande/default.yaml", wino, "validation")
    # Pages longer than max_seq_len=64 tokens: several rolling windows each.
    pages = [{"page": " ".join(corpus(8)[i].split()[: 20 + 15 * i])} for i in range(6)]
    write_task(root, "toy_wikitext", "wikitext/wikitext.yaml", pages, "test")
    trivia = [
        {"question": f"What did the {w} see", "question_id": str(i),
         "answer": {"aliases": ["boat", "red"], "value": "boat"}}
        for i, w in enumerate(["man", "daughter", "master", "harbour"])
    ]
    gen = {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0, "max_gen_toks": 12}
    write_task(root, "toy_triviaqa", "triviaqa/default.yaml", trivia, "validation", generation_kwargs=gen)
    return root


TOY_TASKS = ["toy_arc", "toy_lambada", "toy_winogrande", "toy_wikitext", "toy_triviaqa"]


def run(model, task_dir, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, tasks=TOY_TASKS, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True, **kw,
    )


@pytest.mark.slow
def test_matches_lm_eval_hf(model_dirs, task_dir):
    from spectra.eval.harness import SpectraLM

    spectra_dir, hf_dir = model_dirs
    ref = run("hf", task_dir, model_args=f"pretrained={hf_dir},dtype=float32,device=cpu", batch_size=1)
    ours = run(SpectraLM(load(spectra_dir), str(spectra_dir / "tokenizer.json"), batch_size=3), task_dir)
    n_checked = 0
    for task in TOY_TASKS:
        ref_samples, our_samples = ref["samples"][task], ours["samples"][task]
        assert len(ref_samples) == len(our_samples) > 0
        for a, b in zip(sorted(ref_samples, key=lambda s: s["doc_id"]), sorted(our_samples, key=lambda s: s["doc_id"])):
            for ra, rb in zip(a["resps"], b["resps"]):
                ra, rb = ra[0], rb[0]
                if isinstance(ra, str):  # generate_until
                    assert ra == rb
                elif isinstance(ra, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    assert abs(float(ra[0]) - float(rb[0])) < 1e-4, (task, ra, rb)
                    assert bool(ra[1]) == bool(rb[1])
                else:  # loglikelihood_rolling
                    assert abs(float(ra) - float(rb)) < 1e-4, (task, ra, rb)
                n_checked += 1
        for metric, value in ref["results"][task].items():
            if metric.endswith("_stderr,none") or not isinstance(value, float):
                continue
            if "acc" in metric or "exact_match" in metric:
                assert ours["results"][task][metric] == value, (task, metric)
            else:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert n_checked == 10 * 4 + 12 + 6 * 2 + 6 + 4


def test_registered_name_and_pretrained_arg(model_dirs, task_dir):
    from lm_eval.tasks import TaskManager

    spectra_dir, _ = model_dirs
    res = lm_eval.simple_evaluate(
        model="spectra", model_args=f"pretrained={spectra_dir},batch_size=2", tasks=["toy_lambada"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0, log_samples=False, limit=3,
    )
    assert 0.0 <= res["results"]["toy_lambada"]["acc,none"] <= 1.0
    assert res["results"]["toy_lambada"]["perplexity,none"] > 1.0


def test_tokenizer_larger_than_model_is_refused(model_dirs, tmp_path):
    from spectra.eval.harness import SpectraLM

    spectra_dir, _ = model_dirs
    big = train_bpe(corpus() + [TEXT.upper(), TEXT.lower()[::-1]], 400, tmp_path / "big.json", min_frequency=1)
    with pytest.raises(ValueError, match="vocab_size is 320"):
        SpectraLM(load(spectra_dir), str(big))


def test_dtype_option_is_checked(model_dirs):
    """`--model_args dtype=fp16` was getattr(torch, 'fp16'): an AttributeError traceback."""
    from spectra.eval.harness import SpectraLM

    spectra_dir, _ = model_dirs
    for bad in ("fp16", "int8", "Tensor"):
        with pytest.raises(ValueError, match=f"SpectraLM dtype='{bad}'; accepted: auto, float32, float16, bfloat16"):
            SpectraLM(pretrained=str(spectra_dir), dtype=bad)
    lm = SpectraLM(pretrained=str(spectra_dir), dtype="half")
    assert next(lm.model.parameters()).dtype == torch.float16


def test_unknown_task_names_close_matches(model_dirs, task_dir):
    from lm_eval.tasks import TaskManager

    from spectra.eval.run import evaluate

    spectra_dir, _ = model_dirs
    with pytest.raises(ValueError, match=r"'toy_lambda' \(close: toy_lambada"):
        evaluate(spectra_dir, "toy_arc,toy_lambda", limit=1, include_path=task_dir, include_defaults=False)
    from spectra.eval.tasks import check_known

    check_known(["toy_arc", "toy_wikitext"], TaskManager(include_path=str(task_dir), include_defaults=False))


def test_evaluate_offline_missing_data_says_how_to_build(model_dirs, tmp_path):
    from spectra.eval.run import evaluate

    spectra_dir, _ = model_dirs
    with pytest.raises(FileNotFoundError, match="spectra data evals"):
        evaluate(spectra_dir, "arc_easy", offline_dir=tmp_path / "nothing-here", limit=1)


def test_shared_prefix_and_batched_scores_equal_direct_log_softmax(model_dirs):
    from spectra.eval.scoring import score_groups, score_sequences

    model = load(model_dirs[0])
    g = torch.Generator().manual_seed(1)
    groups = [
        (torch.randint(0, 320, (n_ctx,), generator=g).tolist(),
         [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths])
        for n_ctx, lengths in [(23, (1, 5, 3, 9)), (7, (2, 2)), (1, (4, 1, 6)), (30, (3,))]
    ]
    shared = score_groups(model, groups, batch_size=3)
    for (ctx, conts), group_scores in zip(groups, shared):
        batched = score_sequences(model, [ctx + c for c in conts], [len(c) for c in conts], batch_size=3)
        for c, (lp_a, gr_a), (lp_b, gr_b) in zip(conts, group_scores, batched):
            with torch.no_grad():
                logp = model(torch.tensor([ctx + c])).log_softmax(-1)[0]  # (T, V)
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1)
            direct = logp[pos, torch.tensor(c)]
            greedy = logp[pos].argmax(-1) == torch.tensor(c)
            torch.testing.assert_close(lp_a, direct, atol=1e-5, rtol=0)
            torch.testing.assert_close(lp_b, direct, atol=1e-5, rtol=0)
            assert torch.equal(gr_a, greedy) and torch.equal(gr_b, greedy)


def model_kinds(root):
    """(name, model) for every kind spectra.load returns, all with the same tokenizer-compatible config."""
    from spectra.packed.io import pack_model
    from spectra.ptq.pipeline import quantize

    tok = train_bpe(corpus(), 300, root / "tokenizer.json", min_frequency=1)
    (root / "calib" / "train").mkdir(parents=True)
    (root / "calib" / "train" / "text.txt").write_text("\n".join(corpus()))
    kinds = []
    for family in ("floatlm", "trilm"):
        cfg = tiny_config(dim=256, n_heads=4, glu_dim=512, vocab_size=320, max_seq_len=128, family=family,
                          init_std=0.1)
        save_model(build_model(cfg, seed=0), root / family, tokenizer=tok)
        kinds.append((family, load(root / family)))
    pack_model(load(root / "trilm"), root / "packed")
    kinds.append(("packed", load(root / "packed")))
    quantize(root / "floatlm", root / "quantlm", bits=4, calib=root / "calib", n_samples=12, seq_len=64, group_size=64,
             progress=False)
    kinds.append(("quantlm", load(root / "quantlm")))
    return tok, kinds


@pytest.mark.slow
def test_every_model_kind_matches_its_own_forward(tmp_path):
    """FloatLM, latent TriLM, packed TriLM and QuantLM through the adapter (shared-context cache path and batched
    path) against each model's own full forward pass + log_softmax."""
    from lm_eval.api.instance import Instance

    from spectra.eval.harness import SpectraLM

    tok_path, kinds = model_kinds(tmp_path)
    assert [type(m.layers[0].mlp.up_proj).__name__ for _, m in kinds][2:] == ["PackedTernaryLinear", "QuantLinear"]
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    pairs = [(sents[i], " " + sents[(i + j) % len(sents)][:25]) for i in range(3) for j in range(3)]
    pairs += [(sents[3][:40], " and"), ("", sents[4][:20])]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for name, model in kinds:
        lm = SpectraLM(model, str(tok_path), batch_size=2)  # groups of 3 continuations split into 2 + 1
        got = lm.loglikelihood(requests, disable_tqdm=True)
        for (ctx, cont), (logp, greedy) in zip(pairs, got):
            if ctx:
                ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
            else:
                ctx_ids, cont_ids = [lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)
            with torch.no_grad():
                full = model(torch.tensor([ctx_ids + cont_ids])).float().log_softmax(-1)[0]
            pos = torch.arange(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
            target = torch.tensor(cont_ids)
            assert logp == pytest.approx(float(full[pos, target].sum()), abs=1e-4), name
            assert greedy == bool((full[pos].argmax(-1) == target).all()), name

    from spectra.accounting import quantlm_bits, size_in_bits, size_report
    from spectra.eval.results import model_identity

    bits = {name: model_identity(m, tmp_path / name) for name, m in kinds}
    cfg = kinds[0][1].config
    paper = size_report(cfg)["bits"]
    expected = {"floatlm": paper["floatlm"], "trilm": paper["trilm"], "packed": paper["trilm"],
                "quantlm": size_in_bits(cfg, quantlm_bits(4, 64))}  # quantized in groups of 64: 4.5 bits a weight
    for name, ident in bits.items():  # the size table's "this_model" too (a QuantLM's was the FloatLM's 16 bits)
        assert ident["size_bits"] == ident["size"]["bits"]["this_model"] == expected[name], name
    assert [bits[n]["kind"] for n in expected] == ["model", "model", "packed", "quantlm"]


def test_standard_errors_are_lm_evals_mean_stderr():
    """lm-eval leaves `acc_stderr` out when its bootstrap is off (bootstrap_iters=0, which `evaluate` passes: its
    bootstrap spawns a process per core); `add_stderr` puts back what lm-eval's `mean_stderr` computes from the logged
    per-document scores: for 0/1 scores and for probabilities (truthfulqa_mc2's acc, where the binary form
    sqrt(p(1 - p)/(n - 1)) was 2.3x too large), none where the task's value is not their mean or there is one
    document; the table prints it."""
    from lm_eval.api.metrics import mean_stderr

    from spectra.eval.results import add_stderr, format_table

    scores = [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    probs = [0.02, 0.31, 0.05, 0.11, 0.0, 0.07]
    p = sum(scores) / len(scores)
    metrics = {"arc_easy": {"acc": p, "acc_norm": 1.0}, "lambada_openai": {"perplexity": 12.5, "acc": 0.0},
               "one": {"acc": 1.0}, "mc2": {"acc": sum(probs) / len(probs)}, "other": {"acc": 0.5}}
    samples = {"arc_easy": [{"acc": x, "acc_norm": 1, "filter": "none"} for x in scores]
               + [{"acc": 1 - x, "acc_norm": 0, "filter": "other"} for x in scores],  # a second filter's documents
               "lambada_openai": [{"acc": 0, "perplexity": -3.0}] * 4, "one": [{"acc": 1}],
               "mc2": [{"acc": x} for x in probs], "other": [{"acc": 0}, {"acc": 0}]}
    add_stderr(metrics, samples)
    assert metrics["arc_easy"]["acc_stderr"] == pytest.approx(mean_stderr(scores), rel=1e-12)
    assert metrics["mc2"]["acc_stderr"] == pytest.approx(mean_stderr(probs), rel=1e-12)
    assert metrics["arc_easy"]["acc_norm_stderr"] == 0.0 and metrics["lambada_openai"]["acc_stderr"] == 0.0
    assert "perplexity_stderr" not in metrics["lambada_openai"] and "acc_stderr" not in metrics["one"]
    assert "acc_stderr" not in metrics["other"]  # 0.5 is not the mean of its documents' scores
    table = format_table({"model": {}, "tasks": metrics, "settings": {"tasks": ["arc_easy"]}})
    assert f"acc {100 * p:.1f} ± {100 * mean_stderr(scores):.1f}" in table


def test_group_standard_errors_combine_their_members():
    """A group's standard error from its members', as its mean combines them: weighted by size, sqrt(sum n_i^2
    se_i^2) / sum n_i; a plain mean, sqrt(sum se_i^2) / k; nested groups after their members; none when a member has
    none or the group's value is neither mean."""
    import math

    from spectra.eval.results import add_stderr

    a, b, c = [1, 0, 1, 1], [0, 0, 1, 0, 1, 0], [1, 1, 0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics = {"a": {"acc": mean(a)}, "b": {"acc": mean(b)}, "c": {"acc": mean(c)},
               "w": {"acc": mean(a + b)}, "u": {"acc": (mean(a) + mean(b)) / 2},
               "top": {"acc": mean(a + b + c)}, "odd": {"acc": 0.123}}
    samples = {k: [{"acc": x} for x in v] for k, v in {"a": a, "b": b, "c": c}.items()}
    add_stderr(metrics, samples, {"top": ["w", "c"], "w": ["a", "b"], "u": ["a", "b"], "odd": ["a", "b"]})
    se = {k: metrics[k]["acc_stderr"] for k in "abc"}
    assert metrics["w"]["acc_stderr"] == pytest.approx(math.sqrt((4 * se["a"]) ** 2 + (6 * se["b"]) ** 2) / 10)
    assert metrics["u"]["acc_stderr"] == pytest.approx(math.sqrt(se["a"] ** 2 + se["b"] ** 2) / 2)
    top = math.sqrt((10 * metrics["w"]["acc_stderr"]) ** 2 + (3 * se["c"]) ** 2) / 13
    assert metrics["top"]["acc_stderr"] == pytest.approx(top)
    assert "acc_stderr" not in metrics["odd"]


def test_evaluate_standard_errors_equal_lm_evals(model_dirs, task_dir):
    """`spectra eval`'s standard errors (lm-eval's bootstrap off) equal the ones lm-eval computes with it on, for
    every mean-of-documents metric of two toy tasks."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.tasks import TaskManager

    from spectra.eval import evaluate
    from spectra.eval.harness import SpectraLM

    spectra_dir, _ = model_dirs
    names = ["toy_arc", "toy_winogrande"]
    res = evaluate(spectra_dir, ",".join(names), include_path=task_dir, include_defaults=False, progress=False)
    lm = SpectraLM(load(spectra_dir), str(spectra_dir / "tokenizer.json"), progress=False)
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False).load(names)
    ref = lm_evaluate(lm=lm, task_dict=tasks, bootstrap_iters=100)["results"]
    checked = 0
    for task in names:
        for key, value in ref[task].items():
            if key.endswith("_stderr,none") and isinstance(value, float):
                assert res["tasks"][task][key.split(",")[0]] == pytest.approx(value, rel=1e-9), (task, key)
                checked += 1
    assert checked == 3  # arc: acc, acc_norm; winogrande: acc
