"""Generated tokens attributed to the context before them (toolkit.attribution.generation): a token
removed through the attention mask is as if it were not in the text at all, and on the trained gpt
removing the most credited context tokens first lowers the generated token's probability faster
than removing them in random orders."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.attribution.generation import explain_generation
from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model


def _logprob(model, context, token):
    """log p(token | context) from the model's own graph, run on the context as given (no mask trick)."""
    from toolkit.attribution.generation import _next_token_logprobs
    from toolkit.runtime.generate.layout import Layout

    layout = Layout.of(model.name, model.inputs, model.outputs, model.bundle.manifest.generation)
    run = _next_token_logprobs(model, layout)
    return run({"input_ids": np.array([context], dtype=np.int64), "attention_mask": np.ones((1, len(context)), dtype=np.int64)})["logprobs"][0, token]


def _llama(exported):
    from models.hf_causal import causal_lm

    return exported(f"hf:{causal_lm('llama')}", None)


@pytest.mark.parametrize("decoder", ["gpt", "llama"])
def test_a_masked_token_is_as_if_it_were_deleted_from_the_text(decoder, exported):
    """Occlusion's credit of context token j for generated token k equals log p(k | context) - log p(k |
    context with j deleted): positions are counted over the kept tokens, and the prediction is read
    after the last one kept."""
    model = Model(exported("gpt") if decoder == "gpt" else _llama(exported), provider="cpu")
    prompt = [5, 17, 42, 9, 77, 3]
    explained = explain_generation(model, prompt, max_new_tokens=3)
    assert explained.attributions.shape == (len(explained.tokens), len(prompt) + len(explained.tokens) - 1)
    context = prompt + explained.tokens
    for k, token in enumerate(explained.tokens):
        length = len(prompt) + k
        whole = _logprob(model, context[:length], token)
        assert explained.logprob[k] == pytest.approx(whole, abs=1e-5)
        deleted = [whole - _logprob(model, context[:j] + context[j + 1: length], token) for j in range(length)]
        np.testing.assert_allclose(explained.attributions[k, :length], deleted, rtol=1e-3, atol=1e-4)
        assert np.isnan(explained.attributions[k, length:]).all()
    # two copies per run: most runs carry on from the cache of the prefix their rows share
    np.testing.assert_allclose(explain_generation(model, prompt, tokens=explained.tokens, chunk=2).attributions,
                               explained.attributions, rtol=1e-4, atol=1e-5)


def test_shapley_credits_sum_to_the_change_from_knowing_nothing(exported):
    model = Model(exported("gpt"), provider="cpu")
    explained = explain_generation(model, "Return the", max_new_tokens=2, method="shapley", samples=3)
    uniform = -np.log(next(t.high for t in model.inputs if t.name == "input_ids"))  # log p of a token when nothing is known
    for k in range(len(explained.tokens)):
        total = np.nansum(explained.attributions[k])
        assert total == pytest.approx(explained.logprob[k] - uniform, abs=1e-4)


def test_removing_the_most_credited_context_lowers_the_token_more_than_random(exported):
    """Faithfulness on the trained gpt, as ERASER's comprehensiveness (DeYoung et al., 2020): the
    drop of a generated token's log-probability when the top 1, 5, 10, 20 and 50% most credited
    context tokens are removed, averaged, against as many random ones. (The deletion curve, which
    removes them cumulatively, is confounded on a byte-level model: with a word's last bytes gone
    the context ends on another word, where what comes next is likely again.)"""
    from toolkit.attribution.generation import comprehensiveness

    model = Model(exported("gpt", "default"), provider="cpu")
    for method in ("occlusion", "shapley"):
        explained = explain_generation(model, 'def read(self, size):\n    """Return the', max_new_tokens=6, method=method,
                                       **({"samples": 4} if method == "shapley" else {}))
        attributed, random = comprehensiveness(model, explained, seed=0)
        assert attributed.mean() > random.mean(), (method, attributed, random)


def test_bad_requests_name_what_is_wrong(exported):
    model = Model(exported("gpt"), provider="cpu")
    with pytest.raises(ToolkitError, match="must be one token id or more"):
        explain_generation(model, [])
    with pytest.raises(ToolkitError, match="fit the context"):
        explain_generation(model, [1, 2], tokens=[3] * 1000)
    with pytest.raises(ToolkitError, match="not 'integrated-gradients'"):
        explain_generation(model, "x", method="integrated-gradients")


def test_the_command_line_shades_each_generated_tokens_context(exported, cli, tmp_path):
    from toolkit.attribution.pictures import shaded

    path = exported("gpt", "default")
    shown = cli("explain", path, "--prompt", "Return the", "-n", "3", "--plot", tmp_path / "why.html")
    assert shown.exit_code == 0, shown.output
    assert "generated: " in shown.output and shown.output.count(" ← Return the") == 3
    page = (tmp_path / "why.html").read_text()
    assert page.count("<span ") == 10 + 11 + 12 and "<script" not in page  # each token's context, a span per byte
    assert "give --prompt TEXT" in cli("explain", path, "--example").output
    text = shaded(["a", "\n", "b"], np.array([2.0, -1.0, 0.0]))
    assert text.plain == "a⏎b" and [str(span.style) for span in text.spans] == \
        ["black on rgb(255,0,0)", "black on rgb(127,127,255)", "black on rgb(255,255,255)"]


def test_an_encoder_decoders_answer_is_attributed_to_its_source(exported):
    """The zoo's seq2seq reverses strings: each answer character's most credited source character,
    beside the last one (removing any shifts where the reversal starts), is the one it copies."""
    from toolkit.attribution.generation import comprehensiveness

    model = Model(exported("seq2seq"), provider="cpu")
    explained = explain_generation(model, "hello world", max_new_tokens=6)
    assert bytes(explained.tokens).decode() == "dlrow "
    source = explained.prompt
    assert explained.source and explained.attributions.shape == (6, len(source)) and explained.context(3) == len(source)
    for k in range(1, len(explained.tokens)):  # token 0 copies the last character, which every token leans on
        credit = explained.attributions[k, :-1]
        assert int(np.argmax(credit)) == len(source) - 1 - k, (k, credit.round(2))
    attributed, random = comprehensiveness(model, explained)
    assert attributed.mean() > random.mean()


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq"])
def test_every_zoo_model_is_explained_from_the_command_line(name, exported, cli, tmp_path):
    path = exported(name)
    given = ["--prompt", "Return the", "-n", "2"] if name in ("gpt", "seq2seq") else ["--example", "--save", tmp_path]
    shown = cli("explain", path, *given)
    assert shown.exit_code == 0, shown.output
    assert ("generated: " in shown.output) if name in ("gpt", "seq2seq") else any(tmp_path.glob("*.npy"))
