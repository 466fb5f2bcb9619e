"""Reference stage artifact (round trip, resume, mismatch, failure) and the io helpers it uses."""

import json

import pytest
import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.lm.rewards import CallableReward
from infalign.lm.scoring import token_logprobs
from infalign.run.config import SamplingConfig
from infalign.run.io import (
    append_jsonl,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
    read_jsonl,
    run_manifest,
    write_manifest,
)
from infalign.run.reference import ReferenceSet, build_reference, tie_fraction

PROMPTS = ["The cat", "Human: hi\n\nAssistant:", "A good answer", "x", "Birds sing", "We"]
SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=8)


class Flaky:
    """The length reward, but it raises on call number ``fail_at`` (an interruption)."""

    description = "callable:reward_fns:length_reward"

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at
        self.fn = CallableReward("reward_fns:length_reward")

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.fn(prompts, completions)


def _build(tiny_lm, out, reward=None, **kw):
    model, tok = tiny_lm or (None, None)
    args = dict(sampling=SAMPLING, num_samples=4, seed=3, prompts_per_chunk=2, progress=False)
    args.update(kw)
    reward = reward or CallableReward("reward_fns:length_reward")
    return build_reference(model, tok, PROMPTS, reward, out_dir=out, **args)


@pytest.fixture(scope="module")
def full(tiny_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref_full")
    return d, _build(tiny_lm, d)


def test_round_trip(tiny_lm, full):
    d, ref = full
    assert sorted(p.name for p in d.iterdir()) == ["reference.json", "reference.jsonl"]
    assert ref.rewards.shape == (6, 4) and ref.num_tokens.shape == (6, 4)
    assert ref.rewards.dtype == torch.float32
    assert ref.rewards.tolist() == [[float(len(c)) for c in g] for g in ref.completions]
    loaded = ReferenceSet.load(d)
    assert loaded.prompts == PROMPTS and loaded.completions == ref.completions
    assert torch.equal(loaded.rewards, ref.rewards) and torch.equal(
        loaded.num_tokens, ref.num_tokens
    )
    meta = loaded.meta
    assert meta["num_samples"] == 4 and meta["seed"] == 3 and meta["num_prompts"] == 6
    assert meta["sampling"]["max_new_tokens"] == 8
    assert meta["reward"] == "callable:reward_fns:length_reward"
    assert meta["tie_fraction"] == pytest.approx(ref.tie_fraction())
    rows = read_jsonl(d / "reference.jsonl")
    assert [r["index"] for r in rows] == list(range(6))
    assert set(rows[0]) == {
        "index",
        "prompt",
        "completions",
        "num_tokens",
        "rewards",
        "token_ids",
        "logprobs",
    }
    assert torch.equal(loaded.logprobs, ref.logprobs) and loaded.token_ids == ref.token_ids
    cal = loaded.calibration()
    assert isinstance(cal, EmpiricalCalibration) and cal.num_prompts == 6
    # a second identical request reuses the artifact
    again = _build(tiny_lm, d, reward=Flaky(fail_at=1))
    assert torch.equal(again.rewards, ref.rewards)


def test_stored_tokens_and_logprobs_are_the_samples(tiny_lm, full):
    """``generation()`` rebuilds the sampled rows exactly: the token ids decode to the stored
    texts, and the scorer's sequence log-probs on them equal the stored log pi_ref (1e-5)."""
    _check_stored(tiny_lm, full[1])


def test_native_backend_stores_its_own_logprobs(tiny_lm, tmp_path):
    """sampling.backend native: the stored log pi_ref are the sampler's, equal to the scorer's."""
    native = SamplingConfig(max_new_tokens=8, batch_size=8, backend="native")
    ref = _build(tiny_lm, tmp_path, sampling=native)
    assert ref.meta["sampling"]["backend"] == "native"
    _check_stored(tiny_lm, ref)


def test_artifact_without_newer_sampling_keys_is_reused(full, tmp_path):
    """An artifact written before sampling.backend / sampling.top_k existed reads them as their
    defaults: reused, not resampled."""
    d, ref = full
    for f in ("reference.json", "reference.jsonl"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    meta = read_json(tmp_path / "reference.json")
    del meta["sampling"]["backend"], meta["sampling"]["top_k"]
    atomic_write_json(tmp_path / "reference.json", meta)
    again = _build(None, tmp_path, reward=Flaky(fail_at=1))  # no model, no reward call
    assert again.completions == ref.completions


def _check_stored(tiny_lm, ref):
    model, tok = tiny_lm
    assert ref.logprobs.dtype == torch.float64 and ref.logprobs.shape == (6, 4)
    assert [[len(t) for t in g] for g in ref.token_ids] == ref.num_tokens.tolist()
    idx = torch.tensor([[3, 0], [1, 2], [0, 3]])
    gen = ref.generation(tok, [5, 0, 2], idx)
    assert gen.num_prompts == 3 and gen.num_samples == 2
    assert gen.texts == [
        [ref.completions[p][int(j)] for j in js] for p, js in zip([5, 0, 2], idx, strict=True)
    ]
    flat = tok.batch_decode(
        [gen.completion_ids[b, : int(gen.completion_mask[b].sum())].tolist() for b in range(6)],
        skip_special_tokens=True,
    )
    assert flat == [t for g in gen.texts for t in g]
    lp = token_logprobs(model, gen, temperature=SAMPLING.temperature)
    seq = (lp.double() * gen.completion_mask.double()).sum(-1).view(3, 2)
    want = torch.stack([ref.logprobs[p, js] for p, js in zip([5, 0, 2], idx, strict=True)])
    assert torch.allclose(seq, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sample_idx"):
        ref.generation(tok, [0, 1], torch.zeros(3, 1, dtype=torch.long))


def test_old_format_is_reported(full, tmp_path):
    d, _ = full
    for f in ("reference.json", "reference.jsonl"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    meta = read_json(tmp_path / "reference.json")
    meta["format_version"] = 1
    atomic_write_json(tmp_path / "reference.json", meta)
    with pytest.raises(ValueError, match=r"format_version=1.*delete the directory"):
        ReferenceSet.load(tmp_path)


def test_resume_equals_uninterrupted(tiny_lm, full, tmp_path):
    _, ref = full
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_lm, tmp_path, reward=Flaky(fail_at=3))  # chunks 0, 1 done, chunk 2 fails
    assert not (tmp_path / "reference.jsonl").exists()
    rows = read_jsonl(tmp_path / "reference.partial.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    # a torn write of a later chunk: dropped on resume
    with open(tmp_path / "reference.partial.jsonl", "a") as f:
        f.write(json.dumps({"index": 4, "chunk": 2, "prompt": "Birds sing"}) + "\n")
        f.write('{"index": 5, "chu')
    flaky = Flaky(fail_at=0)
    resumed = _build(tiny_lm, tmp_path, reward=flaky)
    assert flaky.calls == 1  # only the missing chunk was sampled and scored
    assert resumed.completions == ref.completions
    assert torch.equal(resumed.rewards, ref.rewards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.json", "reference.jsonl"]


def test_mismatch(tiny_lm, full, tmp_path):
    d, _ = full
    with pytest.raises(ValueError, match=r"num_samples=4.*num_samples=5"):
        _build(tiny_lm, d, num_samples=5)
    with pytest.raises(ValueError, match="sampling"):
        _build(tiny_lm, d, sampling=SamplingConfig(max_new_tokens=8, batch_size=8, top_p=0.9))
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="prompts_sha256"):
        build_reference(
            model,
            tok,
            PROMPTS[::-1],
            CallableReward("reward_fns:length_reward"),
            SAMPLING,
            4,
            d,
            seed=3,
            prompts_per_chunk=2,
            progress=False,
        )
    # a partial run is checked too
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_lm, tmp_path, reward=Flaky(fail_at=2))
    with pytest.raises(ValueError, match=r"seed=3.*seed=4"):
        _build(tiny_lm, tmp_path, seed=4)


def test_reward_error_leaves_no_files(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="nan for prompt 1"):
        _build(tiny_lm, tmp_path, reward=CallableReward("reward_fns:nan_reward"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no reference artifact"):
        ReferenceSet.load(tmp_path)


def test_bad_input(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        _build(tiny_lm, tmp_path, num_samples=1)
    with pytest.raises(ValueError, match="prompts_per_chunk"):
        _build(tiny_lm, tmp_path, prompts_per_chunk=0)
    assert list(tmp_path.iterdir()) == []


def test_tie_fraction():
    r = torch.tensor([[1.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    assert tie_fraction(r) == pytest.approx((0.5 + 0.75 + 0.0) / 3)


def test_io_helpers(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"t": torch.tensor([1.5, 2.0]), "p": tmp_path})
    assert read_json(tmp_path / "a" / "x.json")["t"] == [1.5, 2.0]
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "nan.json").exists()
    append_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"a": 2}])
    append_jsonl(tmp_path / "r.jsonl", [{"a": 3}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"a": 4')
    with pytest.raises(ValueError, match="line 4"):
        read_jsonl(tmp_path / "r.jsonl")
    assert len(read_jsonl(tmp_path / "r.jsonl", strict=False)) == 3
    from safetensors import safe_open

    atomic_save_safetensors(tmp_path / "t.safetensors", {"w": torch.ones(2)}, {"step": 3, "n": "a"})
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3", "n": "a"} and f.get_tensor("w").sum() == 2
    m = run_manifest({"x": (1, 2)}, seed=7)
    assert m["seed"] == 7 and m["config"] == {"x": [1, 2]} and "torch" in m["versions"]
    assert read_json(write_manifest(tmp_path, {"x": 1}, 0))["versions"]["infalign"]
