"""The shipped evaluate modules work offline and give the textbook numbers."""

import pytest

from finetune.errors import FinetuneError
from finetune.metrics import Metrics, installed_metrics


def test_builtin_metrics_are_installed_through_the_entry_point():
    assert {"accuracy", "f1", "macro_f1", "matthews_correlation", "precision", "recall", "top5_accuracy"} <= set(installed_metrics())


def test_binary_scores():
    # tp=1 fp=1 fn=0 tn=2
    scores = Metrics(["accuracy", "precision", "recall", "f1", "matthews_correlation"]).compute(
        predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]
    )
    assert scores["accuracy"] == 0.75
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["matthews_correlation"] == pytest.approx(1 / 3**0.5)


def test_multiclass_scores_are_macro_averaged():
    scores = Metrics(["f1", "precision", "recall"]).compute(predictions=[0, 1, 2, 0], references=[0, 1, 2, 1])
    # per class precision 0.5, 1, 1; recall 1, 0.5, 1
    assert scores["precision"] == pytest.approx(2.5 / 3)
    assert scores["recall"] == pytest.approx(2.5 / 3)
    assert scores["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_a_class_absent_from_the_split_still_counts_in_a_three_class_task():
    # Labels 0, 1, 2; this split holds no class 2, and one example is predicted as 2.
    predictions, references = [0, 1, 1, 0, 2], [0, 1, 1, 1, 0]
    scores = Metrics(["f1", "macro_f1", "precision", "recall"], {"labels": [0, 1, 2]}).compute(predictions, references)
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 1 R 2/3 F1 4/5; class 2: no support, P 0 (1 false positive) F1 0
    assert scores["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert scores["f1"] == scores["macro_f1"]  # macro for three classes, whichever classes the split holds
    assert scores["precision"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores["recall"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    # Without the label set, the split alone would decide: binary F1 of class 1 when 2 were never predicted.
    assert Metrics(["f1"]).compute([0, 1, 1, 0], [0, 1, 1, 1])["f1"] == pytest.approx(0.8)
    assert Metrics(["f1"], {"labels": [0, 1, 2]}).compute([0, 1, 1, 0], [0, 1, 1, 1])["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_a_two_class_task_is_binary_even_when_a_split_holds_one_class():
    scores = Metrics(["f1", "accuracy"], {"labels": [0, 1]}).compute(predictions=[1, 1, 0], references=[1, 1, 1])
    assert scores["f1"] == pytest.approx(0.8)  # P 1, R 2/3: binary F1 of class 1; accuracy ignores `labels`
    assert scores["accuracy"] == pytest.approx(2 / 3)


def test_macro_f1_treats_two_classes_alike():
    scores = Metrics(["f1", "macro_f1"]).compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    # class 1: P 0.5 R 1 F1 2/3; class 0: P 1 R 2/3 F1 0.8
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_top5_accuracy_ranks_the_scores():
    references = [0, 1, 2]
    scores = [
        [9, 8, 7, 6, 5, 4, 0],  # class 0 first
        [9, 0, 8, 7, 6, 5, 4],  # class 1 last: a miss
        [9, 8, 7, 6, 5.5, 4, 0],  # class 2 third: a hit
    ]
    result = Metrics(["accuracy", "top5_accuracy"]).compute([0, 0, 0], references, scores)
    assert result == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    # With five classes or fewer every reference is in the top five: the metric says nothing.
    assert Metrics(["top5_accuracy"]).compute([0, 1], [0, 1], [[1, 0], [0, 1]]) == {}


def test_a_ranking_metric_needs_scores():
    with pytest.raises(FinetuneError, match="'top5_accuracy' ranks classes by score.*returns no `scores`"):
        Metrics(["top5_accuracy"]).compute([0, 1], [0, 1])


def test_unknown_metric_without_the_hub():
    with pytest.raises(FinetuneError, match="could not load the metric 'bleurt-xl'.*Metrics that work offline: accuracy, .*macro_f1, matthews_correlation"):
        Metrics(["bleurt-xl"])


def test_a_metric_plugin_naming_no_module_is_reported(tmp_path, monkeypatch):
    from finetune import plugins

    from finetune import testing

    site = testing.write_distribution(tmp_path, "lost-metric", "1.0",
                                      {"finetune.metrics": {"lost": "lost_metric.scores", "object": "finetune.metrics.f1:F1"}})
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(FinetuneError, match=r"^eval.metrics: the metric 'lost' from the distribution 'lost-metric 1.0' "
                                            r"\(lost_metric.scores\) cannot be used: .*lost_metric"):
        Metrics(["lost"])
    with pytest.raises(FinetuneError, match=r"the entry point must name a module \(package.module\), not an object in it"):
        plugins.metric_file("object")


def test_evaluation_gathers_only_the_top_scores_and_ranks_as_the_full_scores_do():
    # 12 classes: the ranking metric needs 5 scores per example; the evaluation moves only those, and
    # top-5 accuracy equals the one of the full score matrix, computed by hand.
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from finetune.training.eval_loop import evaluate

    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(37, 12, generator=generator), torch.randint(0, 12, (37,), generator=generator)

    class Scorer:
        def eval_step(self, model, batch):
            out = {"loss": torch.zeros(len(batch["labels"])), "predictions": batch["scores"].argmax(-1),
                   "references": batch["labels"], "scores": batch["scores"]}
            return out

        def count_items(self, batch):
            return torch.ones(len(batch["labels"]))

    rows = [{"scores": s, "labels": y} for s, y in zip(scores, labels)]
    loader = DataLoader(rows, batch_size=8, collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    metrics = Metrics(["accuracy", "top5_accuracy"])
    assert metrics.score_top_k == 5
    shapes = []

    class Recording(Accelerator):
        def gather_for_metrics(self, data, **options):
            shapes.append(tuple(data.shape))
            return super().gather_for_metrics(data, **options)

    result = evaluate(Recording(cpu=True), torch.nn.Identity(), Scorer(), loader, metrics).metrics
    assert (8, 5) in shapes and not [s for s in shapes if s[-1:] == (12,)]  # 5 scores per example, never 12
    top5 = scores.topk(5, dim=-1).indices
    by_hand = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    assert result["top5_accuracy"] == pytest.approx(by_hand)
    assert result["accuracy"] == pytest.approx((scores.argmax(-1) == labels).float().mean().item())
