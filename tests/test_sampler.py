"""The shared sampler reproduces HF's logits pipeline (processors + warpers)."""
import numpy as np
import pytest

from huatuo_lite.families.llava import GenerationConfig
from huatuo_lite.sampler import Sampler, softmax, top_k_filter, top_p_filter

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def hf_pipeline(logits, generated, cfg):
    """HF's order for do_sample=True: RepetitionPenalty -> Temperature -> TopK -> TopP."""
    ids = torch.tensor([generated], dtype=torch.long)
    scores = torch.tensor(logits[None], dtype=torch.float32)
    chain = [lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
             lp.TemperatureLogitsWarper(cfg.temperature),
             lp.TopKLogitsWarper(cfg.top_k),
             lp.TopPLogitsWarper(cfg.top_p)]
    for proc in chain:
        scores = proc(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_processed_scores_equal_hf(top_p):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=300).astype(np.float32) * 3
    logits[[5, 17]] = [-4.0, 6.0]              # a penalised negative and positive score
    cfg = GenerationConfig(top_p=top_p)
    sampler = Sampler(cfg)
    sampler.generated = [5, 17, 17, 40]
    ours = top_p_filter(top_k_filter(sampler._penalised(logits) / np.float32(cfg.temperature), cfg.top_k), top_p)
    theirs = hf_pipeline(logits, sampler.generated, cfg)
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
    np.testing.assert_allclose(softmax(ours), torch.softmax(torch.tensor(theirs), -1).numpy(), atol=1e-6)


def test_greedy_applies_penalty_and_argmax():
    logits = np.array([1.0, 5.0, 4.5, -1.0], dtype=np.float32)
    sampler = Sampler(GenerationConfig(temperature=0, repetition_penalty=1.2))
    assert sampler(logits) == 1
    # 5.0 / 1.2 = 4.17 < 4.5: the repeated token loses to the next one, as in HF.
    assert sampler(logits) == 2


def test_penalty_off_keeps_repeating():
    logits = np.array([1.0, 5.0, 4.5], dtype=np.float32)
    sampler = Sampler(GenerationConfig(temperature=0, repetition_penalty=1.0))
    assert [sampler(logits) for _ in range(3)] == [1, 1, 1]


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    logits = np.log(np.array([0.1, 0.2, 0.7], dtype=np.float32))
    cfg = GenerationConfig(temperature=1.0, repetition_penalty=1.0, top_k=0, seed=7)
    draws = [Sampler(cfg)(logits) for _ in range(5)]
    assert len(set(draws)) == 1                     # same seed, same first draw
    sampler = Sampler(cfg)
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.7], atol=0.03)


# ------------------------------------------------- option validation (#16)
BAD_OPTIONS = [("temperature", float("nan")), ("temperature", 1e-310), ("temperature", float("inf")),
               ("temperature", -0.5), ("temperature", "0.2"), ("top_p", float("nan")), ("top_p", float("inf")),
               ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", float("nan")),
               ("repetition_penalty", float("inf")), ("repetition_penalty", 0.0), ("max_new_tokens", 0),
               ("seed", -1), ("seed", True), ("seed", 1.5)]


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_bad_options_are_one_sentence_naming_the_option(name, value):
    from huatuo_lite.errors import HuatuoError
    from huatuo_lite.families.llava import GENERATION_DEFAULTS

    with pytest.raises(HuatuoError) as info:
        GENERATION_DEFAULTS.with_overrides(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} = ") and message.endswith(".") and message.count(". ") == 0, message
    with pytest.raises(HuatuoError):
        GenerationConfig(**{name: value})            # the constructor checks the same rules


def test_smallest_temperature_samples_finite_probabilities():
    from huatuo_lite.families.llava import MIN_TEMPERATURE

    sampler = Sampler(GenerationConfig(temperature=MIN_TEMPERATURE, top_k=0, repetition_penalty=1.0, seed=0))
    logits = np.array([1e4, -1e4, 3e4, 0.0], dtype=np.float32)
    assert sampler(logits) == 2


def test_unknown_option_is_named():
    from huatuo_lite.errors import HuatuoError
    from huatuo_lite.families.llava import GENERATION_DEFAULTS

    with pytest.raises(HuatuoError, match="'tempreature' is not a generation option"):
        GENERATION_DEFAULTS.with_overrides(tempreature=0.5)
