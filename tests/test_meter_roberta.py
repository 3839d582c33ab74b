"""RoBERTa as METER's text stream (florence.models.roberta, METER(text={"roberta": ...}), from_florence(roberta=)):
read from a local folder (a tiny random RoBERTa written here, tests/conftest.make_tiny_roberta), its states equal
transformers' own model's, its tokenizer's ids, padding that changes nothing, pooling at <s>, save/load without the
folder, and clear errors for a missing folder, another model type and bad token rows."""

import pickle

import pytest
import torch

from florence.models import METER, get_config
from tests.conftest import make_tiny_roberta, requires

pytestmark = requires("transformers")

QUESTIONS = ["how many digits are there?", "is there a seven?", "what digit is to the right of the three?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_roberta(tmp_path_factory.mktemp("roberta") / "tiny")


@pytest.fixture(scope="module")
def loaded(folder):
    from florence.models.roberta import load_roberta

    return load_roberta(folder, max_length=48)


def _meter(stream, **kw):
    torch.manual_seed(0)
    kw = {"width": 32, "heads": 4, "layers": 2, "dropout": 0.0} | kw
    return METER.from_florence(None, 9, get_config("florence_cpu_test")["vision"], roberta=stream, **kw).eval()


def test_tokens_are_the_folders_tokenizers_ids(folder, loaded):
    from transformers import AutoTokenizer

    _, tokens = loaded
    ids = tokens(QUESTIONS)
    assert ids.shape == (3, 48) and ids.dtype == torch.int64
    ref = AutoTokenizer.from_pretrained(folder, local_files_only=True)(QUESTIONS)["input_ids"]
    for row, want in zip(ids.tolist(), ref, strict=True):
        assert row[: len(want)] == want and set(row[len(want) :]) == {1}  # <s> ... </s>, then the pad id
        assert want[0] == 0 and want[-1] == 2 and len(want) == len(QUESTIONS[ref.index(want)].encode()) + 2
    assert tokens([]).shape == (0, 48)
    assert torch.equal(pickle.loads(pickle.dumps(tokens))(QUESTIONS), ids)  # a loader worker loads it again


def test_stream_states_equal_transformers_model(folder, loaded):
    from transformers import RobertaModel

    stream, tokens = loaded
    ids = tokens(QUESTIONS)
    mask = ids != 1
    ref = RobertaModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = stream.eval().forward_tokens(ids, mask)
    assert stream.width == 32 and stream.pad_token_id == 1 and stream.context_length == 64
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=0)


def test_shapes_pooling_at_the_first_token_and_padding_that_changes_nothing(loaded):
    stream, tokens = loaded
    model = _meter(stream)
    ids, images = tokens(QUESTIONS), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(images, ids)
        longest = int((ids != 1).sum(1).max())
        assert out["text"].shape == (3, longest, 32) and out["image"].shape == (3, 4, 32)
        assert out["pooled"].shape == (3, 64) and out["vqa_logits"].shape == (3, 9)
        torch.testing.assert_close(out["pooled"][:, :32], torch.tanh(model.text_pooler(out["text"][:, 0])))
        # a question alone (cut to its own length), with more padding columns, or beside longer questions: the same
        alone = model(images[1:2], ids[1:2])
        padded = model(images, torch.cat([ids, torch.ones(3, 10, dtype=torch.int64)], dim=1))
    torch.testing.assert_close(alone["vqa_logits"], out["vqa_logits"][1:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded["vqa_logits"], out["vqa_logits"], rtol=0, atol=0)


def test_question_only_and_every_parameter_trains(loaded):
    stream, tokens = loaded
    ids = tokens(QUESTIONS[:2])
    model = _meter(stream, question_only=True).train()
    assert model(None, ids)["pooled"].shape == (2, 32)
    model = _meter(stream, itm=False).train()  # (the matching head takes no part in the VQA loss)
    model(torch.randn(2, 3, 64, 64), ids)["vqa_logits"].square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert "text.model.embeddings.word_embeddings.weight" in model.no_weight_decay_names()


def test_save_load_round_trips_without_the_folder(folder, tmp_path):
    import shutil

    from florence.models.roberta import load_roberta

    shutil.copytree(folder, tmp_path / "copy")
    stream, tokens = load_roberta(str(tmp_path / "copy"), max_length=48)
    model = _meter(stream)
    ids, images = tokens(QUESTIONS), torch.randn(3, 3, 64, 64)
    model.save_pretrained(str(tmp_path / "meter"))
    shutil.rmtree(tmp_path / "copy")  # the saved METER needs no RoBERTa folder
    again = METER.from_pretrained(str(tmp_path / "meter")).eval()
    assert again.config["text"] == {"roberta": stream.config} and "_name_or_path" not in stream.config
    with torch.no_grad():
        torch.testing.assert_close(again(images, ids)["vqa_logits"], model(images, ids)["vqa_logits"], rtol=0, atol=0)
    for k, v in stream.state_dict().items():  # from_florence copied the folder's weights
        assert torch.equal(model.text.state_dict()[k], v)


def test_errors_name_the_problem(folder, loaded, tmp_path):
    from florence.models.roberta import RobertaStream, RobertaTokens, load_roberta

    with pytest.raises(FileNotFoundError, match=r"roberta: 'roberta-base' is not a folder.*never downloaded"):
        load_roberta("roberta-base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        RobertaTokens(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"max_length: expected an int >= 2"):
        RobertaTokens(folder, 1)
    with pytest.raises(ValueError, match=r"max_length: 80 is more than .* 64 positions"):
        load_roberta(folder, 80)
    with pytest.raises(ValueError, match=r"roberta: expected a RoBERTa config \(model_type in \('roberta',\)\), got "
                                         r"'bert'"):  # fmt: skip
        RobertaStream({"model_type": "bert"})
    with pytest.raises(ValueError, match=r"roberta: a decoder's config"):
        RobertaStream({"model_type": "roberta", "is_decoder": True})
    with pytest.raises(ValueError, match=r"florence: None \(no pretrained Florence\) needs roberta=<RobertaStream>"):
        METER.from_florence(None, 4, get_config("florence_cpu_test")["vision"], width=32, heads=4)
    stream, tokens = loaded
    model = _meter(stream)
    ids = tokens(QUESTIONS)
    ids[1, 0] = 1
    with pytest.raises(ValueError, match=r"tokens: row 1 starts with RoBERTa's pad id 1"):
        model(torch.randn(3, 3, 64, 64), ids)
    with pytest.raises(ValueError, match=r"tokens: questions of 70 tokens, more than RoBERTa's 64 positions"):
        model(torch.randn(1, 3, 64, 64), torch.full((1, 70), 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"text: a RoBERTa stream is \{'roberta': config\} alone"):
        METER(get_config("florence_cpu_test")["vision"], {"roberta": stream.config, "width": 3}, 4, width=32, heads=4)
