"""Every method config takes recipe=paper|code, and README's "Paper vs released code" table names every config
key whose value depends on the recipe (found by building both recipes of each config and diffing them)."""

import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config module -> extra `:arg` settings under which the recipes are compared (keys that only differ there).
CONFIG_ARGS = {
    "m2d": [""],
    "matpac": [""],
    "jepa": ["", "masking=multiblock,target_domain=latent", "masking=time"],
    "audio_jepa": [""],
    "encodecmae": [""],
}


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _arg(extra: str, recipe: str) -> str:
    return ",".join(part for part in (extra, f"recipe={recipe}") if part)


def recipe_dependent_keys(name: str) -> set[str]:
    module = importlib.import_module(f"configs.{name}")
    keys = set()
    for extra in CONFIG_ARGS[name]:
        paper = _flatten(module.get_config(_arg(extra, "paper")).to_dict())
        code = _flatten(module.get_config(_arg(extra, "code")).to_dict())
        keys |= {k for k in paper.keys() | code.keys() if k != "recipe" and paper.get(k) != code.get(k)}
    return keys


def readme_table() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"^## Paper vs released code\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Paper vs released code' section"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_every_config_takes_both_recipes_and_refuses_others(name):
    module = importlib.import_module(f"configs.{name}")
    assert module.get_config("recipe=paper").recipe == "paper"
    assert module.get_config("recipe=code").recipe == "code"
    assert module.get_config().recipe in ("paper", "code")
    with pytest.raises(ValueError, match="recipe"):
        module.get_config("recipe=best")


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_readme_table_names_every_recipe_dependent_key(name):
    table = readme_table()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    keys = recipe_dependent_keys(name)
    missing = sorted(k for k in keys if not any(f"`{k}`" in row for row in rows))
    assert not missing, f"configs/{name}.py: recipe-dependent keys missing from README's table: {missing}"


def test_the_diff_finds_known_differences():
    """The diff is not vacuous: keys the papers and codes are known to disagree on are found."""
    assert {"model.loss_type", "model.target_norm", "model.predictor_full_grid"} <= recipe_dependent_keys("jepa")
    assert {"data.frontend", "model.loss_type", "optim.lr"} <= recipe_dependent_keys("audio_jepa")
