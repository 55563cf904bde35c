"""README.md runs as written: its command lines parse, the first-run command and the Python API block run.

The README is read when the tests run (not copied here), so an edit to it that no
longer matches the code fails a test:

- every ``progvq ...`` (or ``... run_stage.py ...``) command in a ``bash`` block
  parses with the real argument parser, and a ``train`` command's config and
  ``--set`` overrides load;
- the first-run command (the first line with ``progvq train``) runs as written
  in a scratch folder, with ``configs/tiny.yaml`` in place of its config and the
  run folder named after it, and leaves the files its ``sample`` promises;
- every ``python`` block runs statement by statement on trained tiny runs, with
  its ``runs/...`` folder swapped for the run and its free names (images, an
  image, a mask) bound to real inputs.
"""

from __future__ import annotations

import ast
import builtins
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from progvq.config import load_config
from progvq.data import load_dataset
from progvq.errors import RunError
from progvq.hierarchy import Hierarchy
from progvq.inpaint import box_mask
from run_stage import _parser, main

from .conftest import ROOT, TINY

README = ROOT / "README.md"
#: operators between simple commands on a shell line
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class Block:
    """One fenced code block of the README."""

    language: str
    text: str
    line: int  # line of the opening fence, for messages


def blocks(language: str) -> list[Block]:
    """The README's fenced blocks in ``language``, in order."""
    found = []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^```\s*(\S*)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: code block not closed"
        if opening.group(1) == language:
            found.append(Block(language, "\n".join(lines[i + 1 : end]), i + 1))
        i = end + 1
    return found


def shell_lines(block: Block) -> list[list[list[str]]]:
    """Each logical line of a bash block (continuations joined, comments dropped) as its simple commands' words."""
    out = []
    for line in block.text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # split on blanks and operators only: 0,16,32,32 stays one word
        commands: list[list[str]] = [[]]
        for word in lexer:
            if word in OPERATORS:
                commands.append([])
            else:
                commands[-1].append(word)
        commands = [c for c in commands if c]
        if commands:
            out.append(commands)
    return out


def progvq_argv(words: list[str]) -> list[str] | None:
    """The program's arguments if ``words`` run progvq (``progvq ...``, ``python run_stage.py ...``,
    ``torchrun ... run_stage.py ...``)."""
    if words[0] == "progvq":
        return words[1:]
    for i, word in enumerate(words):
        if Path(word).name == "run_stage.py":
            return words[i + 1 :]
    return None


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line of the block, argv) of every progvq command in the README's bash blocks."""
    found = []
    for block in blocks("bash"):
        for line in shell_lines(block):
            for words in line:
                argv = progvq_argv(words)
                if argv is not None:
                    found.append((block.line, argv))
    return found


def parse(argv: list[str], where: int) -> Any:
    """argparse's reading of ``argv``; a refusal fails the test with the README line (argparse exits 2)."""
    try:
        return _parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"README.md:{where}: progvq {shlex.join(argv)} does not parse (exit status {stop.code})")


# --------------------------------------------------------------------------- command lines


def test_the_readme_shows_progvq_commands() -> None:
    """The checks below are not vacuous: the README has command lines, the first-run one among them."""
    commands = readme_commands()
    verbs = {argv[0] for _, argv in commands if argv}
    assert {"train", "sample"} <= verbs, verbs
    assert blocks("python"), "no python block in README.md"


@pytest.mark.parametrize(
    ("where", "argv"), readme_commands(), ids=lambda x: shlex.join(x) if isinstance(x, list) else str(x)
)
def test_every_readme_command_parses(where: int, argv: list[str]) -> None:
    args = parse(argv, where)
    if args.command == "train":
        # the config it names ships with progvq, and its --set overrides are keys and values the config takes
        config = ROOT / args.config
        assert config.is_file(), f"README.md:{where}: {args.config} is not in the project"
        load_config(config, args.overrides)


def _first_run_line() -> list[list[str]]:
    """The README's first shell line with a ``progvq train`` command: the first-run command."""
    for block in blocks("bash"):
        for line in shell_lines(block):
            if any((argv := progvq_argv(words)) is not None and argv[:1] == ["train"] for words in line):
                return line
    pytest.fail("README.md has no bash line with `progvq train`")


@pytest.mark.trains
def test_first_run_command_runs_as_written_on_the_tiny_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-run command's progvq steps run in order in a scratch folder, on configs/tiny.yaml.

    Installing (pip) is left out: the tests run in the installed project. The
    README's config ``configs/NAME.yaml`` becomes ``configs/tiny.yaml`` (copied
    into the scratch folder so relative paths work as written) and ``runs/NAME``
    becomes ``runs/tiny``, the default run folder of that config.
    """
    line = _first_run_line()
    steps = [argv for words in line if (argv := progvq_argv(words)) is not None]
    train = next(argv for argv in steps if argv[0] == "train")
    name = Path(parse(train, 0).config).stem
    (tmp_path / "configs").mkdir()
    shutil.copy(TINY, tmp_path / "configs" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)

    def swap(word: str) -> str:
        word = word.replace(f"configs/{name}.yaml", "configs/tiny.yaml")
        return re.sub(rf"(^|/)runs/{re.escape(name)}(?=/|$)", r"\1runs/tiny", word)

    for argv in steps:
        argv = [swap(word) for word in argv]
        assert main(argv) == 0, f"progvq {shlex.join(argv)} failed"
        args = parse(argv, 0)
        if args.command == "sample":
            # the grid and, beside it, the images as uint8 arrays
            out = Path(args.out)
            assert Image.open(out).format == "PNG"
            images = np.load(out.with_suffix(".npz"))["images"]
            assert images.dtype == np.uint8 and len(images) == args.n
    assert any(argv[0] == "sample" for argv in steps), "the first-run command samples"
    assert (tmp_path / "runs" / "tiny" / "prior" / "checkpoint.pt").exists()  # --all trained every stage


# --------------------------------------------------------------------------- the Python API


def _free_names(tree: ast.Module) -> set[str]:
    """Names a block reads but never binds (and that are not builtins): what the reader must supply."""
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - set(dir(builtins))


class _RunFolder(ast.NodeTransformer):
    """Swaps every string ``runs/...`` for a trained run's folder."""

    def __init__(self, run: Path) -> None:
        self.run = str(run)
        self.swapped = 0

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and re.fullmatch(r"runs/[\w.-]+/?", node.value):
            self.swapped += 1
            return ast.copy_location(ast.Constant(self.run), node)
        return node


def _inputs(run: Path) -> dict[str, Any]:
    """What the README's API block leaves to the reader: held-out images, one image and a mask of its bottom half."""
    model = Hierarchy.load(run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    _, h, w = model.image_shape
    return {"images": data.heldout[:4], "image": data.heldout[0], "mask": box_mask(h, w, (0, h // 2, w, h))}


def _takes_a_label(statement: ast.stmt) -> bool:
    return any(isinstance(node, ast.keyword) and node.arg == "label" for node in ast.walk(statement))


@pytest.mark.trains
@pytest.mark.parametrize("name", ["tiny_run", "tiny_conditional_run"])
def test_python_api_block_runs(name: str, request: pytest.FixtureRequest) -> None:
    """Each python block runs statement by statement on a trained run.

    On the class-conditional run every statement runs; on the unconditional one a
    statement that passes a class label is refused (RunError) and the rest run.
    """
    run = request.getfixturevalue(name)
    conditional = Hierarchy.load(run).num_classes > 0
    for block in blocks("python"):
        tree = ast.parse(block.text, filename=f"README.md:{block.line}")
        swap = _RunFolder(run)
        tree = ast.fix_missing_locations(swap.visit(tree))
        assert swap.swapped, f"README.md:{block.line}: the block loads no runs/... folder"
        inputs = _inputs(run)
        missing = _free_names(tree) - set(inputs)
        assert not missing, f"README.md:{block.line}: the block uses {sorted(missing)}, which this test cannot supply"
        namespace: dict[str, Any] = {"__name__": "readme", **inputs}
        for statement in tree.body:
            code = compile(ast.Module([statement], type_ignores=[]), f"README.md:{block.line}", "exec")
            if _takes_a_label(statement) and not conditional:
                with pytest.raises(RunError, match="not class-conditional"):
                    exec(code, namespace)  # noqa: S102 - the README's own example, run on purpose
            else:
                exec(code, namespace)  # noqa: S102 - the README's own example, run on purpose
