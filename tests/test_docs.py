"""The commands README.md and docs/*.md show are run, and the output they show is checked.

Rules (they are also the docs' writing rules):

- Every fenced ```sh block is read line by line (a line ending in ``\\`` continues on the next).
  A line is a command when, after an optional ``$ `` and optional ``NAME=value`` assignments, its
  first word is ``shardsurgeon``; other lines (pip, python3, sbatch, cd, comments) are not run.
- A command is run through click's CliRunner, in a fresh folder per page, in the order the page
  gives them, so a later command sees what an earlier one wrote. It must exit 0, or the status
  its trailing comment names: ``# exit status 2``. A command is one command: no pipes,
  redirections or ``&&``.
- A command that needs what a test cannot give (an S3 endpoint, a web server, a Ray cluster, a
  filesystem with reflink) ends in ``# not run: REASON`` and is skipped. A command naming
  ``s3://``, ``http://``, ``https://`` or ``--ray`` without that comment fails the test, as do
  ``...`` and shell variables in a command: docs show whole commands.
- ``$SLURM_ARRAY_TASK_ID`` is the one variable: in a block with ``#SBATCH --array=A-B`` its command
  runs once per task, as the array would (one after the other here).
- A ```text block that follows a ```sh block with only blank lines between is what that block's
  commands print, when all of them ran: every line of it that holds no ``...`` must be a line of
  their output (spaces collapsed, durations such as ``0.0 s`` read as any duration).
- A ```yaml block whose first line is ``# NAME.yml`` is a mergekit config: it is written to
  NAME.yml in every page's folder before its commands run, so a page may use a config another
  page shows (the names must differ).
- The models the commands name are stand-ins built here: the demo's 32-layer Mistral-shaped
  checkpoint (``shardsurgeon.demo.make_demo_checkpoint``: hidden size 64, 3 shards, 2.8 MB) under
  each folder name in ``STANDINS``, and under each Hugging Face id in ``HUB_IDS`` in a cache that
  ``HF_HUB_CACHE`` points to. The outputs the docs show were printed by these stand-ins.
"""

from __future__ import annotations

import re
import shlex
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shardsurgeon.cli import cli
from shardsurgeon.demo import make_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

STANDINS = ("openchat-3.5-0106", "llama-2-7b", "mistral-7b", "Meta-Llama-3.1-405B")
"""Folder names the docs give models; each is the demo checkpoint, built when a page names it."""
HUB_IDS = ("openchat/openchat-3.5-0106",)
"""Hugging Face ids the docs give models; each is the demo checkpoint in the page's cache."""

INFRASTRUCTURE = ("s3://", "http://", "https://", "--ray")
NOT_RUN = re.compile(r"#\s*not run:\s*(?P<reason>\S.*)$")
EXIT_STATUS = re.compile(r"#\s*exit status (?P<status>\d+)\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ARRAY = re.compile(r"^#SBATCH\s+--array=(?P<first>\d+)-(?P<last>\d+)\s*$", re.MULTILINE)
DURATION = re.compile(r"\b\d+(?:\.\d+)? s\b")
TASK = "$SLURM_ARRAY_TASK_ID"


@dataclass
class Command:
    where: str
    """page:line, for messages."""
    text: str
    argv: list[str]
    env: dict[str, str]
    block: int
    """Which ```sh block of its page the command is in."""
    status: int = 0
    skip: str | None = None
    tasks: range | None = None
    """Task ids of a Slurm array the command runs once for (``$SLURM_ARRAY_TASK_ID``)."""
    output: list[str] = field(default_factory=list)
    """Lines the output of its block's commands must hold (from the ```text block that follows),
    given to the block's last command."""


def fenced_blocks(page: Path) -> list[tuple[str, int, list[str], bool]]:
    """(info string, line number of the fence, lines, whether only blank lines precede it since the
    previous block). A block opened by N backticks ends at a line of at least N backticks alone, so
    a ````markdown block may hold ``` blocks (a model card), which are not read as blocks."""
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i, gap_start = 0, 0
    while i < len(lines):
        opening = re.match(r"(`{3,})(.*)$", lines[i])
        if opening is None:
            i += 1
            continue
        fence, info, start = opening[1], opening[2].strip(), i + 1
        end = next((j for j in range(start, len(lines)) if re.fullmatch(f"{fence}`*\\s*", lines[j])), None)
        assert end is not None, f"{page.name}:{start}: a fence that is never closed"
        adjacent = all(not line.strip() for line in lines[gap_start:i])
        blocks.append((info, start, lines[start:end], adjacent))
        i = gap_start = end + 1
    return blocks


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with its line number."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, start=first + 1):
        start, text = pending if pending else (number, "")
        text += line
        if line.endswith("\\"):
            pending = (start, text[:-1] + " ")
        else:
            pending = None
            joined.append((start, text))
    return joined


def parse_command(where: str, line: str, block_text: str, block: int) -> Command | None:
    text = line.strip().removeprefix("$ ")
    if text.startswith("#"):
        return None
    words = shlex.split(text, comments=True)
    env = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words or words[0] != "shardsurgeon":
        return None
    command = Command(where, text, words[1:], env, block)
    if match := NOT_RUN.search(text):
        command.skip = match["reason"]
        return command
    if match := EXIT_STATUS.search(text):
        command.status = int(match["status"])
    code = text.split("#")[0]
    needs = [what for what in INFRASTRUCTURE if what in code]
    assert not needs, f"{where}: `{text}` needs {needs[0]}: end it with `# not run: REASON`"
    assert "..." not in code, f"{where}: `{text}` is not a whole command: write it out, or mark it `# not run:`"
    shell = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"} & set(words)
    assert not shell, f"{where}: `{text}` is more than one command ({shell.pop()}); the test runs shardsurgeon alone"
    if TASK in code:
        array = ARRAY.search(block_text)
        assert array, f"{where}: {TASK} outside a block with #SBATCH --array=A-B"
        command.tasks = range(int(array["first"]), int(array["last"]) + 1)
    elif "$" in code:
        raise AssertionError(f"{where}: `{text}` uses a shell variable; write the value, or mark it `# not run:`")
    return command


def parse_page(page: Path) -> list[Command]:
    steps: list[Command] = []
    last_block_commands: list[Command] = []
    for index, (info, start, lines, adjacent) in enumerate(fenced_blocks(page)):
        if info == "sh":
            last_block_commands = []
            for number, line in logical_lines(lines, start):
                command = parse_command(f"{page.relative_to(ROOT)}:{number}", line, "\n".join(lines), index)
                if command is not None:
                    steps.append(command)
                    last_block_commands.append(command)
            continue
        if info == "text" and adjacent and last_block_commands and all(c.skip is None for c in last_block_commands):
            last_block_commands[-1].output = [line for line in lines if line.strip() and "..." not in line]
        last_block_commands = []
    return steps


def config_files() -> dict[str, str]:
    """The mergekit configs the pages show (```yaml blocks headed ``# NAME.yml``), by file name."""
    files: dict[str, str] = {}
    for page in PAGES:
        for info, start, lines, _ in fenced_blocks(page):
            if info == "yaml" and lines and re.fullmatch(r"#\s*\S+\.ya?ml", lines[0].strip()):
                name = lines[0].lstrip("# ").strip()
                assert name not in files, f"{page.name}:{start}: a second config named {name}"
                files[name] = "\n".join(lines[1:]) + "\n"
    return files


def normal(line: str) -> str:
    return DURATION.sub("N s", " ".join(line.split()))


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_checkpoint(tmp_path_factory.mktemp("standin") / "model")


def prepare(folder: Path, page_text: str, standin: Path) -> Path:
    """The page's folder with a stand-in under every model name it uses and the configs; returns
    its Hub cache."""
    configs = config_files()
    for name, text in configs.items():
        (folder / name).write_text(text, encoding="utf-8")
    named = page_text + "".join(configs.values())
    for name in STANDINS:
        if name in named:
            shutil.copytree(standin, folder / name)
    cache = folder.parent / f"{folder.name}-hub"
    for model_id in HUB_IDS:
        if model_id in named:
            entry = cache / ("models--" + model_id.replace("/", "--"))
            shutil.copytree(standin, entry / "snapshots" / "0123456789abcdef")
            (entry / "refs").mkdir()
            (entry / "refs" / "main").write_text("0123456789abcdef")
    return cache


def invoke(command: Command, task: int | None) -> Result:
    argv = [word.replace(TASK, str(task)) for word in command.argv] if task is not None else command.argv
    return CliRunner().invoke(cli, argv, env=command.env or None)


def check(command: Command, result: Result, task: int | None, block_output: str) -> None:
    """The command's exit status; after the last command of a block, the output its docs show."""
    shown = command.text if task is None else f"{command.text} (task {task})"
    details = f"{command.where}: `{shown}`\n--- output ---\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        details += "\n" + "".join(traceback.format_exception(result.exception))
    assert result.exit_code == command.status, f"exit status {result.exit_code}, not {command.status}: {details}"
    printed = {normal(line) for line in block_output.splitlines()}
    missing = [line for line in command.output if normal(line) not in printed]
    assert not missing, f"the output the docs show is not what the commands print: {missing}\n{details}"


def run_page(page: Path, folder: Path, standin: Path, monkeypatch: pytest.MonkeyPatch) -> list[Command]:
    """Run the page's commands in ``folder``; returns the commands skipped."""
    folder.mkdir()
    cache = prepare(folder, page.read_text(encoding="utf-8"), standin)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    skipped, block, block_output = [], -1, ""
    for step in parse_page(page):
        if step.skip is not None:
            skipped.append(step)
        else:
            if step.block != block:
                block, block_output = step.block, ""
            for task in step.tasks or [None]:
                result = invoke(step, task)
                block_output += result.output
                check(step, result, task, block_output)
    return skipped


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_commands_run(page: Path, tmp_path: Path, standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    skipped = run_page(page, tmp_path / "page", standin, monkeypatch)
    for command in skipped:
        print(f"not run: {command.where}: {command.skip}")


def test_every_page_shows_commands_and_the_skipped_say_why() -> None:
    for page in PAGES:
        commands = parse_page(page)
        if page.name != "performance.md":
            assert commands, f"{page.name} shows no shardsurgeon command"
        for command in commands:
            assert command.skip is None or len(command.skip.split()) >= 2, f"{command.where}: say what it needs"


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    info, _, lines, _ = fenced_blocks(ROOT / "README.md")[0]
    assert info == "sh"
    assert readme.split("```")[0] == "# shardsurgeon\n\n", "the README starts with its title, then the commands"
    assert lines == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/shardsurgeon demo",
        ".venv/bin/pip install '.[test]' && .venv/bin/pytest",
    ]
    assert f"\n{lines[1]}\n" in (ROOT / ".ci" / "run").read_text(), ".ci/run runs the README's test command verbatim"


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
