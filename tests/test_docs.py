"""The user docs (README.md, docs/*.md) stay true to the tree: every relative link resolves (files, and
`#anchors` of headings by GitHub's anchor rule), every config key they name exists in config.yaml, and no
machine path leaks into them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# a.b or a.b.c (a segment may be a <placeholder> standing for any existing child)
KEY = r"[A-Za-z_]\w*(?:\.(?:\w+|<[\w ]+>))+"
KEY_SPAN = re.compile(rf"(?:cfg\.)?({KEY})")
KEY_ASSIGNMENT = re.compile(rf"(?<![\w./<-])(?:cfg\.)?({KEY})=(?!=)")
PLACEHOLDER = re.compile(r"^<[\w ]+>$")
# `model.onnx`, `bench.csv`: file names that start like a config group
FILE_NAME = re.compile(r"\w+\.(?:onnx|xml|bin|pt|pth|engine|json|csv|png|jpg|yaml|txt|py|md)")
# Keys the docs may name that config.yaml cannot list, each with the reason.
ALLOWED_KEYS = {
    r"label_to_name\.\d+": "label_to_name takes new class ids on the command line (label_to_name.4=dog)",
}
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:tmp|home|root|work)(?=/|\b)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def code_texts(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, whole span?) for every inline code span and every line of a fenced block."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            found.append((number, line, False))
        else:
            found += [(number, m.group(2).strip(), True) for m in CODE_SPAN.finditer(line)]
    return found


def github_anchor(heading: str) -> str:
    """GitHub's rule: the heading's text, lower-cased, anything but letters, digits, '_', '-' and spaces
    dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_anchor(match.group(2))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """'file:line: target (why)' for each relative link of a markdown file that does not resolve."""
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group(2)
            if not target or SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and resolved.suffix != ".md":
                problems.append(f"{where} (an anchor into a file that is not markdown)")
            elif anchor and anchor not in anchors(resolved):
                problems.append(f"{where} (no heading with that anchor in {resolved.name})")
    return problems


def config_tree(path: Path = ROOT / "config.yaml") -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def key_exists(tree: dict, key: str) -> bool:
    """Walk config.yaml along the dotted key; a <placeholder> segment matches any existing child."""
    head, _, rest = key.partition(".")
    if PLACEHOLDER.match(head):
        children = list(tree.values())
    elif head in tree or (head.isdigit() and int(head) in tree):
        children = [tree[head] if head in tree else tree[int(head)]]
    else:
        return False
    if not rest:
        return True
    return any(isinstance(child, dict) and key_exists(child, rest) for child in children)


def named_keys(path: Path, groups: set[str]) -> list[tuple[int, str]]:
    """(line, key) for every config key the doc names: a whole code span `a.b(.c)` or a `a.b=value`
    anywhere, whose first part is a config group (a file name like `model.onnx` is not a key)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for number, code, whole_span in code_texts(text):
        span = KEY_SPAN.fullmatch(code) if whole_span else None
        found += [(number, span.group(1))] if span else []
    for number, line in enumerate(text.splitlines(), start=1):
        found += [(number, m.group(1)) for m in KEY_ASSIGNMENT.finditer(line)]
    return [
        (number, key) for number, key in found if key.split(".")[0] in groups and not FILE_NAME.fullmatch(key)
    ]


def unknown_keys(path: Path, tree: dict) -> list[str]:
    groups = {name for name, value in tree.items() if isinstance(value, dict)}
    return [
        f"{path.name}:{number}: {key}"
        for number, key in named_keys(path, groups)
        if not key_exists(tree, key) and not any(re.fullmatch(allowed, key) for allowed in ALLOWED_KEYS)
    ]


def machine_paths(path: Path) -> list[str]:
    return [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if MACHINE_PATH.search(line)
    ]


# ---------------------------------------------------------------------------------------------- the docs


def test_docs_exist():
    names = {path.name for path in DOCS}
    assert {
        "README.md",
        "data.md",
        "training.md",
        "segmentation.md",
        "deployment.md",
        "benchmarks.md",
    } <= names


def test_every_relative_link_resolves():
    problems = [problem for path in DOCS for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_config_key_named_exists():
    tree = config_tree()
    problems = [problem for path in DOCS for problem in unknown_keys(path, tree)]
    assert not problems, "keys not in config.yaml:\n" + "\n".join(problems)


def test_no_machine_paths():
    problems = [problem for path in DOCS for problem in machine_paths(path)]
    assert not problems, "machine paths:\n" + "\n".join(problems)


def test_readme_fits_a_few_screens():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


# ---------------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Training speed: idle Intel Xeon", "training-speed-idle-intel-xeon"),
        ("check_errors", "check_errors"),
        (
            "Prepare images — `make preprocess` / `python -m src.etl.preprocess`",
            "prepare-images--make-preprocess--python--m-srcetlpreprocess",
        ),
        ("Near-duplicates and the doctor's speed", "near-duplicates-and-the-doctors-speed"),
        ("The model: D-FINE and **DEIM-D-FINE**", "the-model-d-fine-and-deim-d-fine"),
    ],
)
def test_github_anchor_rule(heading, anchor):
    assert github_anchor(heading) == anchor


def test_checks_flag_a_broken_doc(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n"
        "[ok](other.md#other-page) [ok](other.md#same-1) [ok](#title) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad here](#nowhere)\n"
        "`[not a link](missing.md)`\n"
        "```\n[in a block](missing.md) train.epoch=3\n```\n"
        "Keys: `train.epochs`, `train.lrs.<size>.base_lr`, `model.onnx`, `label_to_name.7=x`, `train.epoch`,\n"
        '`export.tolerance.<group>.nope`, `src.common.io`, and make train ARGS="model.nam=s". See /tmp/x.\n',
        encoding="utf-8",
    )
    links = broken_links(doc)
    assert [problem.split(": ")[1].split(" ")[0] for problem in links] == [
        "missing.md",
        "other.md#nope",
        "#nowhere",
    ]
    tree = {
        "train": {"epochs": 1, "lrs": {"n": {"base_lr": 0.1}}},
        "model": {"name": "n"},
        "export": {"tolerance": {"fp32": {"box_px": 1.0}}},
        "label_to_name": {0: "a"},
    }
    unknown = [problem.split(": ")[1] for problem in unknown_keys(doc, tree)]
    assert sorted(unknown) == ["export.tolerance.<group>.nope", "model.nam", "train.epoch", "train.epoch"]
    assert len(machine_paths(doc)) == 1
