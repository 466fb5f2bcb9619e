"""``infalign export``: the trained policy as a Hugging Face model directory that transformers loads
alone, with the same logits as the trained checkpoint (a LoRA adapter merged in), and a model card
that carries eval.json's numbers; unfinished training or evaluation is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import RECIPE, tiny_overrides, write_tiny_assets

from infalign.cli import main
from infalign.run import pipeline
from infalign.run.export import export_policy
from infalign.run.recipe import load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def _over(assets, out, **extra):
    return tiny_overrides(assets, out, **{"rl.steps": 2, **extra})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_card(card: str, ev: dict) -> None:
    for w in (*ev["win_rate"].values(), ev["standard_win_rate"]):
        assert f"{w['mean']:.4f} [{w['low']:.4f}, {w['high']:.4f}]" in card
    kl = ev["kl"]
    assert f"{kl['mean']:.4f} ± {kl['stderr']:.4f} [{kl['low']:.4f}, {kl['high']:.4f}]" in card
    assert f"| beta | {ev['policy']['beta']!r} |" in card
    assert f"-> {ev['policy']['resolved_transform']}" in card


def test_export_loads_with_transformers_and_matches_the_checkpoint(assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    over = _over(assets, tmp_path / "run")
    args = [tok for k, v in over.items() for tok in (f"--{k}", str(v))]
    cfg = load_config(RECIPE, over)
    to = tmp_path / "exported"
    with pytest.raises(ValueError, match=r"no finished training run .*infalign train RECIPE"):
        export_policy(cfg, "ctrl-exp", None, to)
    pipeline.run_train(cfg, "ctrl-exp")
    cli = ["export", str(RECIPE), *args, "--method", "ctrl-exp", "--to", str(to)]
    capsys.readouterr()
    assert main(cli) == 2  # trained but not evaluated
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`infalign evaluate RECIPE --method ctrl-exp --beta 0.1`" in err[0]
    ev = pipeline.run_evaluate(cfg, "ctrl-exp")
    assert not to.exists()
    assert main(cli) == 0
    assert f"exported ctrl-exp to {to}" in capsys.readouterr().out

    assert (to / "model.safetensors").is_file() and not list(to.glob("*.bin"))
    assert not (to / "trainer_state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(str(to)).eval()
    ckpt = tmp_path / "run" / "train" / "ctrl-exp" / "beta=0.1" / "checkpoint"
    trained = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(to))
    ids = torch.tensor([tok.encode("The quick brown fox jumps over")])
    assert torch.equal(_logits(model, ids), _logits(trained, ids))
    card = (to / "README.md").read_text()
    _check_card(card, ev)
    assert "infalign export " in card and "--method ctrl-exp --to" in card
    assert json.loads((to / "infalign.json").read_text())["eval"] == ev
    assert main(cli) == 2  # never into a non-empty directory
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_a_lora_policy_is_exported_merged(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"model.lora_r": 2, "model.lora_target_modules": "c_attn", "rl.lr": 0.05}
    lora["methods"] = "[{name: raw, transform: raw, betas: [0.1, 0.2]}]"
    cfg = load_config(RECIPE, _over(assets, tmp_path / "run", **lora))
    pipeline.run_train(cfg, "raw", 0.1)
    ev = pipeline.run_evaluate(cfg, "raw", 0.1)
    with pytest.raises(
        ValueError, match=r"--beta is required: method 'raw' has betas \[0\.1, 0\.2\]"
    ):
        export_policy(cfg, "raw", None, tmp_path / "merged")
    to = export_policy(cfg, "raw", 0.1, tmp_path / "merged")
    assert not (to / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(to)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(assets["model"])).eval()
    ckpt = tmp_path / "run" / "train" / "raw" / "beta=0.1" / "checkpoint"
    adapted = PeftModel.from_pretrained(base, str(ckpt)).eval()
    ids = torch.arange(3, 40).view(1, -1)
    want = _logits(adapted, ids)
    with adapted.disable_adapter():
        assert not torch.allclose(want, _logits(adapted, ids), atol=1e-4)  # the adapter trained
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    card = (to / "README.md").read_text()
    _check_card(card, ev)
    assert "LoRA r=2 merged" in card
