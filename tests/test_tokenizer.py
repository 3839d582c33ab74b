"""florence.get_tokenizer: by model config name (open_clip's get_tokenizer(model_name)), its context length is the
config's text context, so encode_text takes its tokens for every registered config; by context length as before;
clear errors for unknown names and bad arguments."""

import pytest
import torch

import florence
from florence.models import get_config, list_models
from tests.conftest import requires

pytestmark = requires("open_clip")  # the tokenizer

TEXTS = ["a photo of a cat", "two dogs playing in the snow " * 20]  # the second longer than any context


@pytest.mark.parametrize("name", list_models())
def test_model_tokenizer_fits_its_text_tower(name):
    tok = florence.get_tokenizer(name)
    context = get_config(name)["text"]["context_length"]
    assert tok.context_length == context
    tokens = tok(TEXTS)
    assert tokens.shape == (2, context) and tokens.dtype == torch.int64
    assert int(tokens[1, -1]) == tok.eot_token_id  # the long text is cut, its end-of-text kept
    if "cpu" in name:  # the small configs run the text tower (a few ms); the large ones only check the context
        model = florence.create_model(name).eval()
        with torch.no_grad():
            emb = model.encode_text(tokens)
        assert emb.shape == (2, model.config["embed_dim"]) and torch.isfinite(emb).all()


def test_cpu_test_model_takes_its_tokenizer_and_not_the_77_default():
    model = florence.create_model("florence_cpu_test").eval()
    assert florence.get_tokenizer("florence_cpu_test").context_length == 16
    with pytest.raises(ValueError, match="tokens: 77 positions exceed the context length 16"):
        model.encode_text(florence.tokenize(TEXTS))


def test_context_length_forms_and_caching():
    assert florence.get_tokenizer().context_length == 77
    assert florence.get_tokenizer(16) is florence.get_tokenizer(context_length=16)
    assert florence.get_tokenizer("florence_cpu_test") is florence.get_tokenizer(16)
    assert florence.get_tokenizer("florence_cpu_demo", context_length=8).context_length == 8  # shorter: allowed
    torch.testing.assert_close(florence.tokenize(TEXTS, 16), florence.get_tokenizer("florence_cpu_test")(TEXTS))


def test_errors_name_the_argument():
    unknown = "name: 'florence_giant' is not a registered model config; known: florence_base, .*, florence_tiny$"
    with pytest.raises(ValueError, match=unknown):
        florence.get_tokenizer("florence_giant")
    with pytest.raises(ValueError, match="context_length: 77 exceeds the text context 16 of 'florence_cpu_test'"):
        florence.get_tokenizer("florence_cpu_test", context_length=77)
    with pytest.raises(ValueError, match="context_length: expected an int >= 3, got 2"):
        florence.get_tokenizer(context_length=2)
    with pytest.raises(ValueError, match="context_length: given twice"):
        florence.get_tokenizer(16, context_length=16)
    with pytest.raises(TypeError, match="name: expected a model config name"):
        florence.get_tokenizer(16.0)
