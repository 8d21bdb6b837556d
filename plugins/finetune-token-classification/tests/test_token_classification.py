"""The token-classification plugin, tested from the outside: through finetune's conformance
check, its CLI, the saved models reloaded with transformers and peft, and its errors."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ner_sentences import CONLL_TAGS, ner_recipe, sentences

from finetune import testing
from finetune.api import PUBLIC_MODULES
from finetune.errors import DataError
from finetune.metrics import Metrics

PLUGIN = Path(__file__).resolve().parent.parent
PACKAGE = PLUGIN / "finetune_token_classification"


@pytest.fixture(scope="module")
def runs(tiny_bert, conll_style_data, tmp_path_factory) -> dict:
    """One short run per declared method, through finetune's conformance check."""
    workdir = tmp_path_factory.mktemp("conformance")
    return testing.check_conformance(ner_recipe(tiny_bert, conll_style_data, workdir / "unused"), workdir, max_steps=18)


def test_conforms_under_every_method(runs):
    assert sorted(runs) == ["feature-extraction", "full", "lora"]
    for summary in runs.values():
        assert set(summary.metrics["test"]) == {"loss", "entity_precision", "entity_recall", "entity_f1", "tag_accuracy"}
    # feature extraction trains the classifier only: hidden size 32 × 9 CoNLL tags + 9 biases
    assert runs["feature-extraction"].parameters["trainable"] == 32 * 9 + 9


def test_tag_names_come_from_the_hub_style_classlabel(runs):
    config = json.loads((runs["full"].model_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(CONLL_TAGS))] == CONLL_TAGS


def test_entities_are_counted_per_final_split(runs):
    from collections import Counter

    facts = json.loads((runs["full"].run_dir / "metrics.json").read_text())["data"]
    counted = facts["task"]["entities"]
    begun = Counter(tag[2:] for row in sentences(32, "test", seed=4) for tag in row["tags"] if tag.startswith("B-"))
    assert counted["test"] == dict(sorted(begun.items()))
    # the eval split was carved from train after the data was read: both are counted as they ended up
    assert sum(counted["train"].values()) + sum(counted["eval"].values()) == sum(
        tag.startswith("B-") for row in sentences(96, "train", seed=3) for tag in row["tags"])


def test_each_word_is_labelled_on_its_first_subword_only(tiny_bert):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from finetune_token_classification.task import TokenClassification, TokenClassificationOptions

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["wayne", "enterprises", "opened", "in", "nairobi"]
    pieces = [tokenizer.tokenize(w) for w in words]
    assert max(map(len, pieces)) >= 3, pieces  # the tiny vocabulary really splits names

    task = TokenClassification(TokenClassificationOptions())
    raw = DatasetDict({"train": Dataset.from_list([{"tokens": words, "tags": ["B-ORG", "I-ORG", "O", "O", "B-LOC"]}])})
    splits = task.prepare_data(raw)
    task.tokenizer = tokenizer
    labels = task.preprocess(splits, task_model=None)["train"][0]["labels"]

    expected = [-100]  # [CLS]
    for piece, tag in zip(pieces, ["B-ORG", "I-ORG", "O", "O", "B-LOC"]):
        expected += [task.tags.index(tag)] + [-100] * (len(piece) - 1)
    assert labels == expected + [-100]  # [SEP]


def test_truncated_words_are_counted_and_named_in_the_card(tiny_bert, conll_style_data, tmp_path):
    recipe = ner_recipe(tiny_bert, conll_style_data, tmp_path / "run", task={"options": {"max_length": 8}},
                        train={"max_steps": 1})
    summary = testing.run_recipe(tmp_path / "r.yaml", recipe)
    facts = json.loads((summary.run_dir / "metrics.json").read_text())["data"]["task"]
    cut = facts["words_not_scored"]["test"]
    test_words = sum(len(r["tokens"]) for r in sentences(32, "test", seed=4))
    scored = sum(len(p) for p in json.loads((summary.run_dir / "predictions.json").read_text())["test"]["predictions"])
    assert cut > 0 and scored + cut == test_words
    assert f"{cut} words of the test split lay beyond `task.options.max_length`" in summary.card.read_text()


def test_saved_models_reload_and_tag_as_the_run_did(runs, conll_style_data):
    """The full model through transformers, the LoRA adapter through peft: the same tags as the
    run's own evaluation; the adapter gives the same logits as the merged copy."""
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    words = load_dataset("parquet", data_files=str(conll_style_data / "test.parquet"), split="train")["tokens"][:8]

    def tag(model, tokenizer):
        tags, logits = [], []
        for sentence in words:
            encoded = tokenizer(sentence, is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                out = model(**encoded).logits[0]
            ids = encoded.word_ids()
            firsts = [i for i, w in enumerate(ids) if w is not None and w != ids[i - 1]]
            tags.append([model.config.id2label[int(out[i].argmax())] for i in firsts])
            logits.append(out)
        return tags, torch.cat(logits)

    def saved(method):
        return json.loads((runs[method].run_dir / "predictions.json").read_text())["test"]["predictions"][:8]

    full_dir = runs["full"].model_dir
    tags, _ = tag(AutoModelForTokenClassification.from_pretrained(full_dir).eval(), AutoTokenizer.from_pretrained(full_dir))
    assert any(t != "O" for row in tags for t in row)  # the run learnt to tag something
    assert tags == saved("full")

    adapter_dir = runs["lora"].model_dir
    base = AutoModelForTokenClassification.from_pretrained(
        json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"],
        num_labels=len(CONLL_TAGS), id2label=dict(enumerate(CONLL_TAGS)))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tags, adapter_logits = tag(PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer)
    assert tags == saved("lora")
    merged = AutoModelForTokenClassification.from_pretrained(runs["lora"].run_dir / "model-merged").eval()
    assert torch.allclose(tag(merged, tokenizer)[1], adapter_logits, atol=1e-5)


def test_predict_and_evaluate_tag_as_the_run_did(runs, conll_style_data, tmp_path):
    """`finetune predict` on the run's test file gives the run's own tags; `finetune evaluate` its test scores."""
    from finetune_token_classification.task import Tagger

    def finetune(*args):
        out = subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True, env=os.environ)
        assert out.returncode == 0, out.stderr[-3000:]

    run_dir = runs["full"].run_dir  # the run that learnt to tag entities in its few steps (LoRA: see the conformance kit)
    test_file = conll_style_data / "test.parquet"
    finetune("predict", run_dir, "--input-file", test_file, "--column", "tokens", "-o", tmp_path / "tags.jsonl")
    predicted = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    saved = json.loads((run_dir / "predictions.json").read_text())["test"]["predictions"]
    assert [p["prediction"] for p in predicted] == saved
    tagged = next(p for p in predicted if p["entities"])
    first = tagged["entities"][0]
    assert tagged["prediction"][first["start"]][:2] in ("B-", "I-")
    assert first["text"] == " ".join(tagged["words"][first["start"]:first["end"]])
    assert Tagger.read(None, {"text": " Angela  Merkel visited Paris "}) == ["Angela", "Merkel", "visited", "Paris"]
    with pytest.raises(ValueError, match="the sentence has no words"):
        Tagger.read(None, {"text": "   "})

    finetune("evaluate", run_dir, "--data", test_file, "--name", "again")
    evaluation = json.loads((run_dir / "evaluations" / "again.json").read_text())
    expected = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test"]
    assert evaluation["metrics"] == pytest.approx({k: v for k, v in expected.items() if k != "loss"}, abs=1e-12)


def test_accumulation_weighs_words_not_sentences(conll_style_data, tmp_path):
    """Batch 4 × accumulation 2 equals batch 8 on a loss averaged over words: sentences differ in length,
    so each micro-batch counts by its scored words (count_items), also in the short last window."""
    from ner_sentences import vocabulary
    from safetensors.torch import load_file

    model = testing.tiny_text_model(tmp_path / "bert", "bert", words=vocabulary(), vocab_size=110, dropout=0.0)
    finals = []
    for name, train in (("large", {"batch_size": 8}), ("accumulated", {"batch_size": 4, "grad_accum_steps": 2})):
        # 96 sentences less the 10 carved for eval: 86, so the last window holds 4 + 2 sentences.
        recipe = ner_recipe(model, conll_style_data, tmp_path / name, train={"epochs": 1, "lr": 1e-3, "log_every_steps": 1, **train})
        summary = testing.run_recipe(tmp_path / f"{name}.yaml", recipe)
        assert summary.metrics["eval"]["loss"] > 0
        finals.append((load_file(summary.model_dir / "model.safetensors"), summary.metrics))
    (a, metrics_a), (b, metrics_b) = finals
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert metrics_a["test"]["loss"] == pytest.approx(metrics_b["test"]["loss"], rel=1e-5)


def test_eval_loss_is_the_mean_over_scored_words(tiny_bert, conll_style_data, tmp_path):
    """Evaluated in batches of 5, the test loss weighs each sentence by its scored words: it equals
    transformers' own loss of the saved model over all 32 test sentences in one batch."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from finetune_token_classification.task import TokenClassification

    recipe = ner_recipe(tiny_bert, conll_style_data, tmp_path / "run", train={"max_steps": 1, "eval_batch_size": 5})
    summary = testing.run_recipe(tmp_path / "r.yaml", recipe)

    task = TokenClassification(TokenClassification.Options(max_length=32))
    splits = load_dataset("parquet", data_files={"train": str(conll_style_data / "train.parquet"),
                                                 "test": str(conll_style_data / "test.parquet")})
    splits = task.prepare_data(splits.rename_column("ner_tags", "tags"))
    task.tokenizer = AutoTokenizer.from_pretrained(summary.model_dir)
    test = task.preprocess(splits, None)["test"]
    batch = task.collate([test[i] for i in range(len(test))])
    model = AutoModelForTokenClassification.from_pretrained(summary.model_dir).eval()
    with torch.no_grad():
        reference = float(model(**batch).loss)
    assert len(test) == 32 and summary.metrics["test"]["loss"] == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_two_processes_gather_every_sentences_tags_once_in_order(tiny_bert, conll_style_data, tmp_path):
    """Tag lists of different lengths are gathered across processes as objects: one per sentence, in order."""
    recipe = ner_recipe(tiny_bert, conll_style_data, tmp_path / "run", task={"options": {"max_length": 64}},
                        train={"max_steps": 2, "eval_batch_size": 5})
    path = testing.write_recipe(tmp_path / "r.yaml", recipe)
    out = subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--processes", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["environment"]["processes"] == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    saved = json.loads((tmp_path / "run" / "predictions.json").read_text())["test"]
    words = [len(row["tokens"]) for row in sentences(32, "test", seed=4)]
    assert [len(tags) for tags in saved["predictions"]] == words  # 32 sentences over batches of 5: a ragged end
    assert [len(tags) for tags in saved["references"]] == words


def test_card_has_the_entity_table_and_the_metadata(runs):
    card = (runs["lora"].run_dir / "README.md").read_text()
    assert "library_name: peft" in card and "pipeline_tag: token-classification" in card
    assert "### Entities, test split (32 sentences)" in card
    for kind in ("LOC", "ORG", "PER"):
        assert f"\n| {kind} | " in card
    assert "| **all (micro)** |" in card and "Entities in the training data: LOC" in card
    assert "AutoModelForTokenClassification" in card and "merge_and_unload" in card


def test_entity_scores_are_seqeval_numbers():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predictions = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER cut short: 2 of 3 entities right
    scores = Metrics(["entities"]).compute(predictions, references)
    assert scores == pytest.approx({"entity_precision": 2 / 3, "entity_recall": 2 / 3, "entity_f1": 2 / 3, "tag_accuracy": 5 / 6})


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"words": ["a"], "tags": ["O"]}], "The train split has no 'tokens' column"),
        ([{"tokens": "alice flew", "tags": ["B-PER", "O"]}], "'tokens' column holds Value('string'), not lists of words"),
        ([{"tokens": ["alice", "flew"], "tags": ["B-PER"]}], "1 row(s) whose number of tags differs from their number of words, the first at row 0 (2 words, 1 tags)"),
        ([{"tokens": ["alice", "flew"], "tags": ["PER", "O"]}], "The tags ['PER'] are not IOB2 tags"),
    ],
)
def test_bad_data_is_named(rows, message):
    from datasets import Dataset, DatasetDict

    from finetune_token_classification.task import TokenClassification, TokenClassificationOptions

    with pytest.raises(DataError) as caught:
        TokenClassification(TokenClassificationOptions()).prepare_data(DatasetDict({"train": Dataset.from_list(rows)}))
    assert message in str(caught.value)


def test_a_tag_unseen_in_training_is_refused():
    from datasets import Dataset, DatasetDict

    from finetune_token_classification.task import TokenClassification, TokenClassificationOptions

    splits = DatasetDict({
        "train": Dataset.from_list([{"tokens": ["alice"], "tags": ["B-PER"]}, {"tokens": ["flew"], "tags": ["O"]}]),
        "test": Dataset.from_list([{"tokens": ["acme"], "tags": ["B-ORG"]}]),
    })
    with pytest.raises(DataError, match=r"The test split uses tags the train split never does: \['B-ORG'\]"):
        TokenClassification(TokenClassificationOptions()).prepare_data(splits)


@pytest.mark.slow
def test_the_tiny_recipe_runs_end_to_end_from_the_cli(tmp_path):
    """The shipped offline recipe on the real all-MiniLM-L6-v2: names never seen in training are found."""
    recipe = PLUGIN / "recipes" / "tiny-ner.yaml"
    out = subprocess.run([sys.executable, "-m", "finetune", "run", str(recipe), "--set", f"output.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["test"]["entity_f1"] > 0.7, metrics  # 0.84 when measured; an untrained tagger finds none

    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(tmp_path / "run" / "model"), aggregation_strategy="simple")
    found = {(e["entity_group"], e["word"]) for e in tagger("olga petrova flew to vienna on monday")}
    assert {("PER", "olga petrova"), ("LOC", "vienna")} <= found, found


def test_hub_recipe_validates():
    out = subprocess.run([sys.executable, "-m", "finetune", "validate", str(PLUGIN / "recipes" / "conll2003-bert.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "valid (token-classification with full" in out.stdout


def test_listed_by_finetune_plugins():
    out = subprocess.run([sys.executable, "-m", "finetune", "plugins"], capture_output=True, text=True, check=True).stdout
    lines = [line.split() for line in out.splitlines()]
    assert ["task", "token-classification", "finetune-token-classification", "0.1.0", "ok"] in lines, out
    assert ["metric", "entities", "finetune-token-classification", "0.1.0", "ok"] in lines, out


def test_uses_only_finetunes_public_api():
    """A third party's plugin: every `finetune` import, in the package and its tests, is a documented public module."""
    used = set()
    for path in [*PACKAGE.glob("*.py"), *Path(__file__).parent.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "finetune":  # from finetune import testing
                used |= {f"finetune.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune."):
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used |= {alias.name for alias in node.names if alias.name.split(".")[0] == "finetune"}
    assert used and used <= set(PUBLIC_MODULES), used - set(PUBLIC_MODULES)


def test_every_option_is_documented_in_the_readme():
    from finetune_token_classification.task import TokenClassificationOptions

    readme = (PLUGIN / "README.md").read_text()
    for name, field in TokenClassificationOptions.model_fields.items():
        assert f"| `{name}` | {field.default} | {field.description} |" in readme, name


def test_the_leakage_audit_reads_a_sentence_and_its_tags():
    """Fails if the audit members are missing (the audit would skip this task) or give an unhashable label."""
    from finetune_token_classification.task import TokenClassification

    task = TokenClassification(TokenClassification.Options())
    row = {"tokens": ["John", "lives", "in", "Paris"], "tags": [1, 0, 0, 3]}
    assert task.audit_input(row) == "John lives in Paris"
    assert task.audit_label(row) == (1, 0, 0, 3)
    assert hash(task.audit_label(row)) == hash((1, 0, 0, 3))
