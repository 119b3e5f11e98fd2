"""The README and docs/ cannot drift from the code: the configuration reference is generated from
the dataclasses, the README's Python runs, its command table names real commands and options,
every link and anchor resolves, every documented import exists, and CI runs the README's test
command."""

import argparse
import glob
import importlib
import importlib.util
import os
import re

import pytest

from fastformer.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
DOC_IDS = [os.path.relpath(p, REPO) for p in DOCS]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def code_blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_configuration_reference_is_generated_from_the_dataclasses():
    spec = importlib.util.spec_from_file_location("config_reference", os.path.join(REPO, "scripts",
                                                                                   "config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert read(os.path.join(REPO, "docs", "configuration.md")) == module.reference(), \
        "docs/configuration.md is out of date: run make docs (python scripts/config_reference.py --write)"
    from fastformer.training.config import SECTIONS

    text = module.reference()
    for section, cls in SECTIONS.items():
        for f in cls.__dataclass_fields__:
            row = re.search(rf"^\| `{section}\.{f}` \|.*\| (.*) \|$", text, flags=re.M)
            assert row and row.group(1).strip(), f"{section}.{f} has no comment in its dataclass"


def test_the_readme_starts_with_the_two_commands_and_ci_runs_its_test_command():
    readme = read(os.path.join(REPO, "README.md"))
    first = code_blocks(readme, "bash")[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make demo", "make test"]
    ci = read(os.path.join(REPO, ".ci", "run"))
    steps = [line for line in ci.splitlines() if line and not line.startswith("#")]
    assert steps[-2:] == ["make test", "bash .ci/docker"]  # the tests, then the container image
    makefile = read(os.path.join(REPO, "Makefile"))
    recipe = makefile[makefile.index("$(VENV)/.installed-test:"):].split("\n\n")[0]
    assert recipe.index('"$(TORCH)"') < recipe.index('-e ".[$(TEST_EXTRAS)]"')  # the CPU torch pin first
    assert "TORCH ?= torch==2.13.0" in makefile and "TEST_EXTRAS := dev,torch,plot,hf,mpi,text" in makefile


def test_ci_builds_and_runs_the_image_with_the_readmes_docker_commands():
    readme = read(os.path.join(REPO, "README.md"))
    (block,) = [b for b in code_blocks(readme, "bash") if "docker build" in b]
    build, *runs = [line.split(" # ")[0].strip() for line in block.strip().splitlines()]
    ci = read(os.path.join(REPO, ".ci", "docker"))
    assert build == "docker build -t fastformer ." and f"\n{build} " in ci
    options = 'docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" fastformer '
    assert runs and all(options in r for r in runs)
    assert 'docker run --rm --user "$user" -v "$runs:/runs" fastformer "$@"' in ci  # the README's options


def test_the_readmes_python_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(read(os.path.join(REPO, "README.md")), "python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def subcommands():
    """{"train": parser, ..., "tokenizer train": parser}."""
    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}".strip())
                return
        yield prefix, parser
    return dict(walk(build_parser(), ""))


def test_the_readme_command_table_lists_every_command_with_real_options():
    readme = read(os.path.join(REPO, "README.md"))
    rows = dict(re.findall(r"^\| `fastformer ([a-z ]+)` \| (.*) \|$", readme, flags=re.M))
    commands = subcommands()
    assert set(rows) == set(commands)
    for name, row in rows.items():
        options = {o for a in commands[name]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        listed = set(re.findall(r"`(--[a-z-]+)", row))
        assert listed <= options, f"the README lists {listed - options} for fastformer {name}: no such option"
        assert options <= listed, f"the README's row of fastformer {name} lacks {options - listed}"


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_links_and_anchors_resolve(path):
    text = read(path)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(dest), f"{os.path.relpath(path, REPO)} links to {target}, which does not exist"
        if anchor and dest.endswith(".md"):
            headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", read(dest), flags=re.S | re.M),
                                  flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{os.path.relpath(path, REPO)}: no heading #{anchor}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_documented_imports_exist(path):
    for block in code_blocks(read(path), "python"):
        for module, names in re.findall(r"^\s*from (fastformer[\w.]*) import ([\w, ]+)", block, flags=re.M):
            mod = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(mod, name), f"{os.path.relpath(path, REPO)}: {module} has no {name}"
