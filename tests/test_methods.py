"""The method registry (sida_core/methods): the only list of methods; schemas and hosts ask it, never name one."""
from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from schemas.run import Method as MethodLiteral, RunConfig
from sida_core.methods import Method, Stage, get_method, method_names, register

ROOT = Path(__file__).resolve().parents[1]


def test_registry_lists_the_methods_and_what_each_declares():
    assert method_names() == ("sid", "sida", "sid2a", "add")
    sid, sida, sid2a, add = map(get_method, method_names())
    assert (sid.adversarial_psi, sid.final_stage, sid.starts_from_generator) == (False, Stage.SID, False)
    assert (sida.adversarial_psi, sida.final_stage, sida.starts_from_generator) == (True, Stage.SIDA, False)
    assert (sid2a.adversarial_psi, sid2a.final_stage, sid2a.starts_from_generator) == (True, Stage.SIDA, True)
    assert (add.adversarial_psi, add.final_stage, add.starts_from_generator) == (False, Stage.ADD, False)
    assert [m.needs_real for m in (sid, sida, sid2a, add)] == [False, True, True, True]
    assert [m.critic for m in (sid, sida, sid2a, add)] == ["fake_score"] * 3 + ["discriminator"]
    assert [m.display for m in (sid, sida, sid2a, add)] == ["SiD", "SiDA", "SiD²A", "ADD"]
    for m in (sid, sida, sid2a, add):  # each names a torch module that builds its critic and losses
        impl = m.implementation()
        assert callable(impl.build_critic) and callable(impl.build_losses)


def test_schemas_take_the_allowed_methods_from_the_registry():
    assert typing.get_args(MethodLiteral) == method_names()
    cfg = RunConfig.model_validate({"method": "sid"})
    assert cfg.psi_grad_clip is None and RunConfig.model_validate({"method": "sida"}).psi_grad_clip == 1.0


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register(Method(name="sida", display="x", summary="x", adversarial_psi=True, final_stage=Stage.SIDA))
    assert method_names() == ("sid", "sida", "sid2a", "add")


def test_the_registry_needs_no_torch():
    # schemas import it to validate configs: that must stay cheap (no torch, no Ray)
    out = subprocess.run([sys.executable, "-c", "import sys, sida_core.methods; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_no_method_name_chains_outside_the_registry():
    # a test of a method's name (`if method == "sid2a"`, `method in ("sida", ...)`); a loop over names is fine
    chain = re.compile(r"""(?<!for )\bmethod["'\])]*\s*(==|!=|in\s*[(\[{])|[=!]=\s*["'](sid|sida|sid2a|add)["']""")
    hits = []
    for folder in ("sida_core", "ray_jobs", "pipelines", "schemas", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "methods" in path.relative_to(ROOT).parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if chain.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_labels_show_alpha_only_for_methods_whose_loss_has_it():
    from pipelines.leaderboard import alpha_label

    assert [get_method(m).uses_alpha for m in method_names()] == [m != "add" for m in method_names()]
    assert alpha_label({"method": "sida", "alpha": 1.2}) == "alpha=1.2"
    assert alpha_label({"method": "add", "alpha": 1.0}) == ""
    assert alpha_label({"method": "from-a-newer-checkout", "alpha": 0.5}) == "alpha=0.5"
