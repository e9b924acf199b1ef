"""A LAMBADA-style last-word cloze task from any held-out corpus (a proxy for LAMBADA, not human-validated).

Recipe, per document of the held-out split (passages never cross documents):

1. Collapse whitespace to single spaces and split into sentences after `.`, `!` or `?` (optionally followed by
   closing quotes or brackets) and a space.
2. Pack consecutive sentences into a passage: append the next sentence; while the passage has more than
   `max_words` words drop its first sentence; once it has at least `min_words` words and its last sentence ends on a
   valid target, emit it and start an empty passage.
3. The target is the passage's last word with the sentence's closing punctuation and quotes stripped. It is valid
   when it is alphabetic, has at least 3 letters, is not a stopword, and occurs (case-insensitively, as a word)
   earlier in the passage — a cheap stand-in for LAMBADA's "needs the wider context" filter.
4. The item is `{"text": passage without the final punctuation}`: lambada_openai's schema, so its YAML applies
   unchanged (context = all but the last space-separated word, target = " " + last word).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through thee thou thy thine to too under until up upon very was we
    were what when where which while who whom why will with would ye yet you your yours yourself yourselves shall
    hath doth unto let may must might say said one""".split()
)
SENTENCE_END = re.compile(r"([.!?][\"'”’)\]]*)\s+")  # its group keeps the closers with their sentence
CLOSING = ".,;:!?\"'”’)]"
WORD = re.compile(r"[A-Za-z]+")


def split_sentences(text: str) -> list[str]:
    """`text` cut after each `.`, `!` or `?` and the closing quotes or brackets after it, where a space follows; the
    quotes and brackets stay with their sentence (the split used to drop them: `sleeps." Nobody` became `sleeps.
    Nobody`)."""
    parts = SENTENCE_END.split(text)  # [sentence, its end, sentence, its end, ..., the rest]
    return [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]


def target_word(sentence: str) -> str | None:
    """The last word of a sentence without closing punctuation, if it is a usable cloze target on its own terms."""
    words = sentence.split(" ")
    last = words[-1].rstrip(CLOSING) if words else ""
    if len(last) < 3 or not last.isalpha() or not last.isascii() or last.lower() in STOPWORDS:
        return None
    return last


def build_cloze(documents: Iterable[str], *, min_words: int = 50, max_words: int = 120) -> list[dict[str, str]]:
    """Cloze items `{"text": passage}` from documents, following the module's recipe."""
    if not 0 < min_words <= max_words:
        raise ValueError(f"need 0 < min_words <= max_words, got {min_words}, {max_words}")
    items = []
    for doc in documents:
        sentences = [s.strip() for s in split_sentences(" ".join(doc.split())) if s.strip()]
        passage: list[str] = []
        for sentence in sentences:
            passage.append(sentence)
            while sum(len(s.split(" ")) for s in passage) > max_words:
                passage.pop(0)
            if sum(len(s.split(" ")) for s in passage) < min_words:
                continue
            target = target_word(passage[-1])
            if target is None:
                continue
            text = " ".join(passage)
            body = text[: text.rstrip(CLOSING).rfind(" ")]
            if target.lower() not in {w.lower() for w in WORD.findall(body)}:
                continue
            items.append({"text": f"{body} {target}"})
            passage = []
    return items


def cloze_items(source: str | os.PathLike, split: str = "validation", *, min_words: int = 50,
                max_words: int = 120) -> list[dict[str, str]]:
    """`build_cloze` over `source`'s `split`; a ValueError when it gives no item (`spectra suite` asks before training,
    where the eval step would fail after it)."""
    from spectra.data import read_documents

    items = build_cloze(read_documents(source, split), min_words=min_words, max_words=max_words)
    if not items:
        raise ValueError(f"{source!r} ({split}) gave no cloze items: it needs passages of >= {min_words} words")
    return items


def write_cloze_task(
    source: str | os.PathLike = "builtin",
    out_dir: str | os.PathLike | None = None,
    *,
    split: str = "validation",
    min_words: int = 50,
    max_words: int = 120,
) -> Path:
    """Build the cloze items of `source` (split) and write `spectra_cloze.jsonl` + a task YAML that includes the
    installed lambada_openai YAML and swaps its data source. Returns the folder (an lm-eval include_path)."""
    import lm_eval

    from spectra.data import cache_root
    from spectra.eval.tasks import CLOZE_TASK
    from spectra.files import atomic_file

    items = cloze_items(source, split, min_words=min_words, max_words=max_words)
    out = Path(out_dir) if out_dir is not None else cache_root() / "cloze" / re.sub(r"[^\w.-]+", "_", str(source))
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{CLOZE_TASK}.jsonl"
    with atomic_file(data) as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    config = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml"),
        "task": CLOZE_TASK,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "metadata": {"version": 1.0, "source": str(source), "split": split, "items": len(items)},
    }
    with atomic_file(out / f"{CLOZE_TASK}.yaml") as f:
        f.write(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
    return out
