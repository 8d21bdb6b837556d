"""Recipes: strict schema, all problems at once with key paths and lines, overrides, plugins' options."""

from pathlib import Path

import pytest

from finetune.errors import RecipeError
from finetune.recipe import apply_overrides, load_recipe

REPO = Path(__file__).resolve().parent.parent


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_valid_recipe_fills_defaults_and_plugin_options(recipe_file):
    path, run_dir = recipe_file("lora")
    recipe = load_recipe(path)
    assert recipe.train.scheduler == "linear"
    assert recipe.method_options.r == 8  # the lora plugin's own default
    assert recipe.task_options.max_length == 32
    assert recipe.run_dir == run_dir


def test_unknown_keys_suggest_the_closest_and_give_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ntask: {name: text-classification}\nmodel: {name: m}\n"
        "data: {path: d}\nmethod: {name: full}\ntrain:\n  lr: 1e-3\n  epohcs: 3\n"
    )
    (problem,) = problems_of(path)
    assert problem.startswith("train.epohcs: unknown key (line 8); did you mean 'epochs'?")


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\n"
        "task: {name: text-clasification, options: {}}\n"
        "model: {}\n"
        "data: {files: {train: nowhere.csv}}\n"
        "method: {name: lora, options: {r: lots, alfa: 3}}\n"
        "train: {batch_size: -1, mixed_precision: fp8}\n"
    )
    problems = problems_of(path)
    text = "\n".join(problems)
    assert "model.name: required key is missing (line 3)" in text
    assert "train.batch_size: Input should be greater than or equal to 1 (got -1) (line 6)" in text
    assert "train.mixed_precision: Input should be 'no', 'fp16' or 'bf16' (got 'fp8') (line 6)" in text
    assert "task.name: unknown task 'text-clasification'. Did you mean 'text-classification'?" in text
    assert "method.options.r: Input should be a valid integer" in text
    assert "method.options.alfa: unknown key (line 5); did you mean 'alpha'?" in text
    assert len(problems) == 6


def test_missing_data_file_and_unknown_method(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ntask: {name: text-classification}\nmodel: {name: m}\n"
        "data: {files: {train: missing.jsonl}}\nmethod: {name: prompt-tuning}\n"
    )
    problems = problems_of(path)
    assert any(p.startswith("method.name: unknown method 'prompt-tuning'") and "feature-extraction, full, lora" in p
               for p in problems)
    assert f"data.files.train: file not found: {tmp_path / 'missing.jsonl'} (line 4)" in problems


def test_a_local_data_folder_must_exist_and_resolves_against_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: {name: image-classification}\nmodel: {name: m}\ndata: {path: ./photos}\nmethod: {name: full}\n")
    assert f"data.path: the local folder '{tmp_path / 'photos'}' does not exist (relative paths start at the recipe's folder) (line 4)" in problems_of(path)
    (tmp_path / "photos").mkdir()
    assert load_recipe(path).data_folder == (tmp_path / "photos").resolve()


def test_overrides_parse_yaml_scalars_and_keep_equals_signs():
    raw = {"train": {"lr": 1e-5}, "name": "a"}
    apply_overrides(raw, ["train.lr=3e-4", "train.epochs=2", "name=a=b", "card.tags=[x, y]", "eval.early_stopping.metric=f1"])
    assert raw["train"] == {"lr": 3e-4, "epochs": 2}
    assert raw["name"] == "a=b"
    assert raw["card"] == {"tags": ["x", "y"]}
    assert raw["eval"] == {"early_stopping": {"metric": "f1"}}


def test_bad_override_is_a_recipe_error():
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="'name' is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.first=y"])


def test_override_is_validated_like_the_file(recipe_file):
    path, _ = recipe_file("full")
    assert load_recipe(path, ["train.lr=3e-4"]).train.lr == 3e-4
    (problem,) = problems_of(path, ["train.scheduler=exponential"])
    assert problem.startswith("train.scheduler: Input should be 'linear', 'cosine' or 'constant'")


def test_early_stopping_metric_must_be_computed(recipe_file):
    path, _ = recipe_file("full", eval={"metrics": ["accuracy"], "early_stopping": {"metric": "f1"}})
    (problem,) = problems_of(path)
    assert "eval.early_stopping.metric: 'f1' is not computed; choose one of ['accuracy', 'loss']" in problem


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    load_recipe(recipe)


def test_readme_documents_every_recipe_key():
    from finetune.methods.full import FullOptions
    from finetune.methods.lora import LoraOptions
    from finetune.recipe import Recipe
    from finetune.recipe_errors import _model_in
    from finetune.tasks.image_classification import ImageClassificationOptions
    from finetune.tasks.text_classification import TextClassificationOptions
    from finetune.tasks.text_to_image.options import TextToImageOptions

    def keys(model, prefix):
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            nested = _model_in(field.annotation)
            if nested is None or name == "early_stopping":
                yield prefix + name
            if nested is not None:
                yield from keys(nested, f"{prefix}{name}.")

    readme = (REPO / "README.md").read_text()
    documented = [
        *keys(Recipe, ""),
        *keys(TextClassificationOptions, "task.options."),
        *keys(ImageClassificationOptions, "task.options."),
        *keys(TextToImageOptions, "task.options."),
        *keys(LoraOptions, "method.options."),
        *keys(FullOptions, "method.options."),
    ]
    missing = [key for key in documented if f"| `{key}` |" not in readme]
    assert not missing, f"README lacks rows for {missing}"
