"""What the documents promise about the multi-cloud example holds (issue 12, item 7).

Nothing here reaches a cloud: these check that the files agree with each other and with what
the clouds accept, so that a copied command is not wrong before it is even run.
"""

from __future__ import annotations

import re
import shlex

import yaml

from cloudfed.federation import load_run_config
from tests.e2e_support import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "infra" / "README.md"]
DOCS += sorted((REPO_ROOT / "configs").glob("*.yaml"))
EXAMPLE = REPO_ROOT / "configs" / "multicloud.yaml"
# L4 GPUs per G2 machine type that Vertex AI (Compute Engine) accepts.
L4_PER_G2 = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}


def _commands(text: str) -> list[list[str]]:
    """The shell commands in the document's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_every_config_a_document_names_exists() -> None:
    named = {m for doc in DOCS for m in re.findall(r"configs/[\w.-]+\.yaml", doc.read_text())}
    assert "configs/multicloud.yaml" in named
    missing = sorted(n for n in named if not (REPO_ROOT / n).is_file())
    assert not missing, missing


def test_the_multicloud_example_has_privacy_and_documented_exchange_options() -> None:
    cfg = load_run_config(EXAMPLE)
    names = {p.name for p in cfg.parties}
    assert set(cfg.privacy.dp_sgd) == names  # DP-SGD in every party
    for party, dp in cfg.privacy.dp_sgd.items():
        assert dp.target_epsilon is not None and dp.target_epsilon <= dp.max_epsilon, party
        assert dp.sample_rate is not None, party  # public, so epsilon hides the record count
    assert cfg.protection.default == "secagg"
    raw = yaml.safe_load(EXAMPLE.read_text())["parameters"]["federation"]
    assert "exchange_options" in raw and "endpoint_url" in EXAMPLE.read_text()
    assert not cfg.base_model.startswith("builtin:")


def test_the_stack_commands_register_what_remote_step_operators_need() -> None:
    commands = _commands((REPO_ROOT / "infra" / "README.md").read_text())
    registered = {
        (argv[1], argv[3]) for argv in commands if len(argv) > 3 and argv[2] == "register"
    }
    stack = next(argv for argv in commands if argv[1:3] == ["stack", "register"])
    opts = {stack[i]: stack[i + 1] for i in range(3, len(stack) - 1) if stack[i].startswith("-")}
    assert ("container-registry", opts["-c"]) in registered
    assert ("image-builder", opts["-i"]) in registered
    operators = {stack[i + 1] for i, a in enumerate(stack[:-1]) if a == "-s"}
    parties = load_run_config(EXAMPLE).parties
    wanted = {p.step_operator for p in parties} | {p.light_step_operator for p in parties}
    assert wanted == operators
    assert wanted <= {name for kind, name in registered if kind == "step-operator"}


def test_the_vertex_l4_command_asks_for_a_machine_and_count_vertex_accepts() -> None:
    l4 = [
        _flags(argv)
        for doc in DOCS
        if doc.suffix == ".md"
        for argv in _commands(doc.read_text())
        if "--accelerator_type=NVIDIA_L4" in argv
    ]
    assert l4, "no Vertex L4 example found"
    for flags in l4:
        machine = re.fullmatch(r"g2-standard-(\d+)", flags.get("machine_type", ""))
        assert machine, flags  # an L4 attaches to G2 machines only
        assert int(flags["accelerator_count"]) == L4_PER_G2[int(machine.group(1))], flags
