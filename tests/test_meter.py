"""florence.models.METER: shapes, the text padding mask (padded tokens change nothing; masked keys get exactly zero
weight), the co-attention layer against a literal implementation of its formula, the parameter count against the
docstring's derivation, the question-only baseline, from_florence, save/load, the VQA loss and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from florence.models import METER, create_model, get_config
from florence.models.meter import Attention, CoAttentionLayer, coattention_param_count, sincos_2d, vqa_loss
from florence.tokenizer import tokenize


def _tiny(**kw):
    cfg = get_config("florence_cpu_test")
    args = {"width": 32, "heads": 4, "layers": 2, "dropout": 0.0} | kw
    return METER(cfg["vision"], cfg["text"], 7, **args).eval()


def _tokens(texts, length=16):
    return tokenize(texts, length)


def test_shapes_of_every_output():
    torch.manual_seed(0)
    m = _tiny()
    tokens = _tokens(["how many digits are there?", "is there a seven?", "what colour is the five?"])
    out = m(torch.randn(3, 3, 64, 64), tokens)
    longest = int(tokens.argmax(-1).max()) + 1  # the text stream ends with the batch's longest question
    assert longest < 16 and out["text"].shape == (3, longest, 32)
    assert out["image"].shape == (3, 4, 32)  # 64 px: a 2x2 grid of tokens
    assert out["pooled"].shape == (3, 64) and out["vqa_logits"].shape == (3, 7) and out["itm_logits"].shape == (3, 2)
    assert out["image"].dtype == torch.float32 and torch.isfinite(out["vqa_logits"]).all()
    assert m(torch.randn(1, 3, 96, 64), tokens[:1])["image"].shape == (1, 6, 32)  # non-square: 3x2 tokens
    q = _tiny(question_only=True)
    out = q(None, tokens)
    assert set(out) == {"text", "pooled", "vqa_logits"} and out["pooled"].shape == (3, 32)
    assert not any(n.startswith(("visual.", "image_")) or "cross_attn" in n for n, _ in q.named_parameters())
    assert "itm_logits" not in _tiny(itm=False)(torch.randn(1, 3, 64, 64), tokens[:1])


def test_padded_text_tokens_change_nothing():
    torch.manual_seed(0)
    m = _tiny()
    tokens = _tokens(["is there a seven?", "which digit is on the far left of the image?"])
    images = torch.randn(2, 3, 64, 64)
    ref = m(images, tokens)
    eot = tokens.argmax(dim=-1)
    noisy = tokens.clone()
    g = torch.Generator().manual_seed(1)
    for b in range(2):  # padding replaced by random ids below the end-of-text id (which stays each row's largest)
        n = tokens.shape[1] - eot[b] - 1
        noisy[b, eot[b] + 1 :] = torch.randint(1, int(tokens[b, eot[b]]), (int(n),), generator=g)
    assert not torch.equal(noisy, tokens)
    out = m(images, noisy)
    for key in ("image", "pooled", "vqa_logits", "itm_logits"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-6, msg=key)
    for b in range(2):
        torch.testing.assert_close(out["text"][b, : eot[b] + 1], ref["text"][b, : eot[b] + 1], rtol=0, atol=1e-6)


def test_cutting_the_padding_keeps_the_full_contexts_states():
    """The text stream is cut after the batch's longest question: every output equals the model run on the full
    context with the padding only masked (the states at real positions do not depend on later ones)."""
    torch.manual_seed(0)
    m = _tiny()
    tokens = _tokens(["is there a seven?", "which digit is on the far left?"])
    images = torch.randn(2, 3, 64, 64)
    out = m(images, tokens)
    longest = int(tokens.argmax(-1).max()) + 1
    assert out["text"].shape[1] == longest < 16
    # the full-context computation, written out: the text tower on all 16 positions, padding masked in every layer
    mask = torch.arange(16)[None] <= tokens.argmax(-1, keepdim=True)
    t = m.text_proj(m.text.forward_tokens(tokens)) + m.token_type.weight[0]
    v = m.image_proj(m.visual.forward_tokens(images).reshape(2, 4, -1)) + sincos_2d(2, 2, 32) + m.token_type.weight[1]
    for tl, il in zip(m.text_layers, m.image_layers, strict=True):
        t, v = tl(t, mask, v, None), il(v, None, t, mask)
    eot = tokens.argmax(-1)
    pooled = torch.cat([torch.tanh(m.text_pooler(t[torch.arange(2), eot])), torch.tanh(m.image_pooler(v.mean(1)))], -1)
    torch.testing.assert_close(out["vqa_logits"], m.vqa_head(pooled), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["image"], v, rtol=1e-5, atol=1e-5)
    for b in range(2):
        torch.testing.assert_close(out["text"][b, : eot[b] + 1], t[b, : eot[b] + 1], rtol=1e-5, atol=1e-5)


def test_questions_share_an_image_through_image_index():
    """Three questions about two images: the image tower runs on the two images once; the outputs equal those of
    the images repeated per question."""
    torch.manual_seed(0)
    m = _tiny()
    tokens = _tokens(["is there a seven?", "how many digits are there?", "what colour is the five?"])
    images, index = torch.randn(2, 3, 64, 64), torch.tensor([1, 1, 0])
    stage_calls = []  # images through CoSwin's first stage per call
    handle = m.visual.stages[0].register_forward_hook(lambda mod, args, out: stage_calls.append(out.shape[0]))
    shared = m(images, tokens, index)
    repeated = m(images[index], tokens)
    handle.remove()
    assert stage_calls == [2, 3]
    for key in ("image", "text", "pooled", "vqa_logits", "itm_logits"):
        torch.testing.assert_close(shared[key], repeated[key], rtol=1e-5, atol=1e-5, msg=key)


def test_the_answer_depends_on_the_image_and_on_the_question():
    """At initialisation already: another image changes the logits of the same question, and another question (its
    end-of-text state pooled, even with no fusion layer) changes the logits of the same image."""
    torch.manual_seed(0)
    for layers in (0, 2):
        m = _tiny(layers=layers)
        tokens = _tokens(["is there a seven?", "is there a three?"])
        a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
        same_question = m(torch.cat([a, b]), tokens[:1].repeat(2, 1))["vqa_logits"]
        assert (same_question[0] - same_question[1]).abs().max() > 1e-4, layers
        same_image = m(a.repeat(2, 1, 1, 1), tokens)["vqa_logits"]
        assert (same_image[0] - same_image[1]).abs().max() > 1e-4, layers
        pooled = m(a.repeat(2, 1, 1, 1), tokens)["pooled"]
        assert (pooled[0, :32] - pooled[1, :32]).abs().max() > 1e-4, layers  # the text half: the question read


def test_a_tiny_model_learns_an_answer_only_the_image_gives():
    """One question ("what colour is the square?"), two answers given by the image alone (a red or a blue square on
    grey, anywhere): a tiny METER trained with its towers at 0.1 x the fusion's learning rate (METER's recipe; the
    factor configs/vqa.yaml gives them, here in the test's own optimizer groups) answers fresh images without a
    mistake after 100 steps. Guards the wiring from the image tower to the answer. (With the towers at the full rate
    the same run stays at the prior, loss 2 ln 2: Adam's full-size steps on the towers' gradients, noise while the
    fresh head cannot yet read them, wipe out the colour before the head learns it.)"""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    red, blue = torch.tensor([1.0, 0.0, 0.0])[:, None, None], torch.tensor([0.0, 0.0, 1.0])[:, None, None]

    def batch(n):
        images = torch.full((n, 3, 64, 64), 0.5)
        colour = torch.randint(0, 2, (n,), generator=g)
        for k in range(n):
            y, x = (int(v) for v in torch.randint(0, 48, (2,), generator=g))
            images[k, :, y : y + 16, x : x + 16] = red if colour[k] == 0 else blue
        return images, F.one_hot(colour, 2).float()

    tokens = _tokens(["what colour is the square?"])
    m = METER(get_config("florence_cpu_test")["vision"], get_config("florence_cpu_test")["text"], 2, width=32,
              heads=4, layers=1, dropout=0.0, itm=False)  # fmt: skip
    towers = [p for n, p in m.named_parameters() if n.startswith(("visual.", "text."))]
    fusion = [p for n, p in m.named_parameters() if not n.startswith(("visual.", "text."))]
    opt = torch.optim.AdamW([{"params": towers, "lr": 1e-4}, {"params": fusion, "lr": 1e-3}])
    for _ in range(100):
        images, targets = batch(16)
        loss = vqa_loss(m(images, tokens.repeat(16, 1))["vqa_logits"], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    images, targets = batch(64)
    with torch.no_grad():
        predicted = m(images, tokens.repeat(64, 1))["vqa_logits"].argmax(-1)
    assert (predicted == targets.argmax(-1)).float().mean().item() == 1.0


def test_masked_keys_get_exactly_zero_weight():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    ref = attn(x, ctx, mask)
    wild = ctx.clone()
    wild[~mask] = 1e4  # huge values at the masked keys: any non-zero weight on them would show
    assert torch.equal(attn(x, wild, mask), ref)
    # and the unmasked keys alone give the same result
    for b, n in ((0, 2), (1, 4)):
        torch.testing.assert_close(attn(x[b : b + 1], ctx[b : b + 1, :n]), ref[b : b + 1], rtol=1e-6, atol=1e-6)


def _literal_attention(a: Attention, x, ctx, mask):
    """softmax(q k^T / sqrt(d) + (0 | -inf)) v per head, written out."""
    B, Lq, W = x.shape
    h, d = a.heads, W // a.heads
    q = (x @ a.query.weight.T + a.query.bias).view(B, Lq, h, d).permute(0, 2, 1, 3)
    k = (ctx @ a.key.weight.T + a.key.bias).view(B, -1, h, d).permute(0, 2, 1, 3)
    v = (ctx @ a.value.weight.T + a.value.bias).view(B, -1, h, d).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, Lq, W)
    return o @ a.out.weight.T + a.out.bias


def _layer_norm(x, ln):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_coattention_layer_matches_its_formula():
    torch.manual_seed(0)
    layer = CoAttentionLayer(24, 3, mlp_ratio=2.0, dropout=0.0).double()
    for p in layer.parameters():  # not the identity LayerNorms and zero biases of the initialisation
        torch.nn.init.normal_(p, std=0.3)
    x, other = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 7, 24, dtype=torch.float64)
    x_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    o_mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    y = _layer_norm(x + _literal_attention(layer.self_attn, x, x, x_mask), layer.ln1)
    y = _layer_norm(y + _literal_attention(layer.cross_attn, y, other, o_mask), layer.ln2)
    y = _layer_norm(y + (F.gelu(y @ layer.fc1.weight.T + layer.fc1.bias) @ layer.fc2.weight.T + layer.fc2.bias),
                    layer.ln3)  # fmt: skip
    torch.testing.assert_close(layer(x, x_mask, other, o_mask), y, rtol=1e-10, atol=1e-10)


def test_streams_update_in_parallel_from_the_previous_layer():
    """Layer i of each stream attends to the other stream's layer i - 1 states (METER's co-attention), not to the
    states the other stream's layer i has just produced."""
    torch.manual_seed(0)
    m = _tiny(layers=2)
    tokens, images = _tokens(["how many digits are there?"]), torch.randn(1, 3, 64, 64)
    out = m(images, tokens)
    tokens = tokens[:, : int(tokens.argmax()) + 1]  # METER cuts the padding after the end-of-text token
    mask = torch.arange(tokens.shape[1])[None] <= tokens.argmax(-1, keepdim=True)
    t = m.text_proj(m.text.forward_tokens(tokens)) + m.token_type.weight[0]
    grid = m.visual.forward_tokens(images)
    v = m.image_proj(grid.reshape(1, 4, -1)) + sincos_2d(2, 2, 32) + m.token_type.weight[1]
    for tl, il in zip(m.text_layers, m.image_layers, strict=True):
        t_new = tl(t, mask, v, None)
        v = il(v, None, t, mask)
        t = t_new
    torch.testing.assert_close(out["text"], t, rtol=0, atol=0)
    torch.testing.assert_close(out["image"], v, rtol=0, atol=0)


@pytest.mark.parametrize("width,ratio", [(768, 4.0), (32, 4.0), (48, 2.0)])
def test_parameter_count_per_layer_matches_the_derivation(width, ratio):
    assert sum(p.numel() for p in CoAttentionLayer(width, 4, ratio).parameters()) == coattention_param_count(
        width, ratio
    )
    assert sum(p.numel() for p in CoAttentionLayer(width, 4, ratio, cross=False).parameters()) == (
        coattention_param_count(width, ratio, cross=False)
    )
    if ratio == 4.0:
        assert coattention_param_count(width) == 16 * width**2 + 19 * width
    assert coattention_param_count(768) == 9_451_776


def test_sincos_2d_encodes_columns_then_rows():
    pe = sincos_2d(2, 3, 8)
    assert pe.shape == (6, 8)
    torch.testing.assert_close(pe[4, :2], torch.tensor([math.sin(1.0), math.sin(1e-2)]))  # row 1, column 1
    torch.testing.assert_close(pe[5, :2], torch.tensor([math.sin(2.0), math.sin(2e-2)]))  # column 2
    torch.testing.assert_close(pe[3, 4:6], torch.tensor([math.sin(1.0), math.sin(1e-2)]))  # row 1
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 6)


def test_every_parameter_trains_on_the_vqa_loss():
    torch.manual_seed(0)
    m = _tiny(itm=False).train()
    tokens = _tokens(["how many digits are there?", "is there a seven?"])
    targets = torch.zeros(2, 7)
    targets[0, 2], targets[1, 0] = 1.0, 0.6
    loss = vqa_loss(m(torch.randn(2, 3, 64, 64), tokens)["vqa_logits"], targets)
    loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_vqa_loss_is_bce_summed_over_answers():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 2 / 3, 1.0]])
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(dim=1).mean()
    torch.testing.assert_close(vqa_loss(logits, targets), expected)
    with pytest.raises(ValueError, match="expected equal"):
        vqa_loss(logits, targets[:, :2])


def test_from_florence_copies_both_towers_and_save_load_round_trips(tmp_path):
    torch.manual_seed(0)
    flo = create_model("florence_cpu_test")
    m = METER.from_florence(flo, 5, width=32, heads=4, layers=1, dropout=0.0).eval()
    for k, v in flo.text.state_dict().items():
        assert torch.equal(m.text.state_dict()[k], v), k
    visual = m.visual.state_dict()
    for k, v in flo.visual.state_dict().items():
        if not k.startswith("pyramid_norms."):
            assert torch.equal(visual[k], v), k
    m.save_pretrained(str(tmp_path / "meter"))
    back = METER.from_pretrained(str(tmp_path / "meter"))
    tokens, images = _tokens(["what colour is the five?"]), torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(back.eval()(images, tokens)["vqa_logits"], m(images, tokens)["vqa_logits"])
    q = METER.from_florence(flo, 5, width=32, heads=4, layers=1, question_only=True)
    assert not hasattr(q, "visual") and torch.equal(q.text.token_embedding.weight, flo.text.token_embedding.weight)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        METER.from_pretrained(str(tmp_path))
    from florence.models import ATSSDetector

    ATSSDetector(get_config("florence_cpu_test")["vision"], 3, fpn_channels=16, num_blocks=0).save_pretrained(
        str(tmp_path / "det")
    )
    with pytest.raises(ValueError, match='not a METER config \\(no "model": "meter"\\)'):
        METER.from_pretrained(str(tmp_path / "det"))
    with pytest.raises(ValueError, match="not an ATSSDetector config"):
        ATSSDetector.from_pretrained(str(tmp_path / "meter"))


def test_no_weight_decay_on_embeddings_norms_and_biases():
    names = _tiny().no_weight_decay_names()
    assert {"token_type.weight", "text.token_embedding.weight", "text.positional_embedding"} <= names
    assert "text_layers.0.ln1.weight" in names and "vqa_head.0.bias" in names
    assert "text_layers.0.self_attn.query.weight" not in names and "vqa_head.3.weight" not in names


def test_bad_inputs_name_the_argument():
    m = _tiny()
    tokens = _tokens(["is there a seven?"])
    with pytest.raises(ValueError, match=r"images: expected \(N, 3, H, W\), got \(1, 64, 64\)"):
        m(torch.randn(1, 64, 64), tokens)
    with pytest.raises(ValueError, match="multiples of 32 .* got 48x64"):
        m(torch.randn(1, 3, 48, 64), tokens)
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(torch.randn(2, 3, 64, 64), tokens)
    with pytest.raises(ValueError, match=r"image_index: expected \(1,\) integer rows"):
        m(torch.randn(2, 3, 64, 64), tokens, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"image_index: expected \(1,\) integer rows"):
        m(torch.randn(2, 3, 64, 64), tokens, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"image_index: rows must lie in \[0, 2\).* got 2..2"):
        m(torch.randn(2, 3, 64, 64), tokens, torch.tensor([2]))
    empty = m(torch.randn(0, 3, 64, 64), tokens[:0], torch.zeros(0, dtype=torch.int64))  # an empty batch: empty outputs
    assert empty["vqa_logits"].shape == (0, 7) and empty["image"].shape == (0, 4, 32)
    with pytest.raises(ValueError, match="at least one position"):
        m(torch.randn(1, 3, 64, 64), tokens[:, :0])
    with pytest.raises(ValueError, match=r"tokens: expected \(B, L\) integer token ids"):
        m(torch.randn(1, 3, 64, 64), tokens.float())
    with pytest.raises(ValueError, match="num_answers: expected an int >= 1"):
        METER(get_config("florence_cpu_test")["vision"], get_config("florence_cpu_test")["text"], 0)
    with pytest.raises(ValueError, match="width: 30 must be a multiple of 4"):
        _tiny(width=30, heads=5)


def test_the_benchmarks_cpu_case_runs_on_every_cpu_provider():
    """benchmarks/bench_vqa.py: the quick CPU case through each provider that runs here gives one finite loss whose
    gradient reaches CoSwin (the same weights in every provider: equal losses)."""
    from benchmarks import bench_vqa as bench

    (case,) = bench.cases(True, "cpu", torch.float32)
    losses = {}
    for p in bench.providers("cpu"):
        if p.unavailable("cpu"):
            continue
        images, tokens, targets, spec = case.make_inputs("cpu", torch.float32)
        loss = p.fn(images, tokens, targets, spec)
        loss.backward()
        model = bench._model(*spec, None if p.name == "fused" else p.name, "cpu", torch.float32, "sdpa")
        assert model.visual.embeds[0].proj.weight.grad is not None
        losses[p.name] = loss.item()
    assert set(losses) == {"reference", "fused"}
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["reference"] - losses["fused"]) < 1e-4 * abs(losses["reference"])


def test_fusion_init_scales_with_fan_in():
    """The fusion's Linear weights start at normal(0, 1 / sqrt(fan_in)) (METER's flat 0.02 stalls a narrow fusion:
    METER._init_fusion's docstring), biases at 0, the token-type embedding at BERT's 0.02."""
    torch.manual_seed(0)
    m = _tiny(width=256, layers=1, itm=True)
    for name, layer in (("text_proj", m.text_proj), ("image_proj", m.image_proj), ("vqa_head.0", m.vqa_head[0]),
                        ("query", m.image_layers[0].cross_attn.query), ("fc2", m.text_layers[0].fc2),
                        ("itm_head", m.itm_head)):  # fmt: skip
        std = layer.weight.std().item()
        assert abs(std * layer.in_features**0.5 - 1) < 0.1, (name, std, layer.in_features)
        assert torch.count_nonzero(layer.bias) == 0, name
    assert abs(m.token_type.weight.std().item() - 0.02) < 0.005


def _fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                 causal=False):  # fmt: skip
    """flash-attn 2's flash_attn_varlen_func contract on the CPU (each packed row's queries attend to that row's keys
    only), checking the packing it is given: int32 cu_seqlens from 0 to the packed totals, the longest lengths."""
    for cu, packed, longest in ((cu_seqlens_q, q, max_seqlen_q), (cu_seqlens_k, k, max_seqlen_k)):
        assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == packed.shape[0]
        assert longest == int((cu[1:] - cu[:-1]).max()) and packed.dim() == 3
    assert not causal and dropout_p == 0.0 and k.shape == v.shape
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        (q0, q1), (k0, k1) = cu_seqlens_q[b : b + 2].tolist(), cu_seqlens_k[b : b + 2].tolist()
        rows = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                              v[k0:k1].transpose(0, 1))  # fmt: skip
        out[q0:q1] = rows.transpose(0, 1)
    return out


@pytest.mark.parametrize("question_only", [False, True], ids=["meter", "question_only"])
def test_flash_attn_varlen_backend_packs_the_padding_away(monkeypatch, question_only):
    """attn_backend="flash_attn" through a stand-in for flash_attn_varlen_func (the real one needs CUDA; the GPU test
    runs it): every real token's state and the logits equal SDPA's with its key mask, padded query rows are zero."""
    import sys
    import types

    import florence.models.meter as meter

    sdpa = _tiny(question_only=question_only)
    flash = _tiny(question_only=question_only, attn_backend="flash_attn")
    flash.load_state_dict(sdpa.state_dict())
    tokens = _tokens(["how many digits are there?", "is there a seven?", "what digit is to the left of the three?"])
    images = None if question_only else torch.randn(3, 3, 64, 64)
    with pytest.raises(RuntimeError, match="attn_backend='flash_attn': "):  # no flash-attn (or no CUDA) here
        flash(images, tokens)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=_fake_flash_attn_varlen_func))  # fmt: skip
    monkeypatch.setattr(meter, "flash_attn_unavailable", lambda x=None: None)
    with torch.no_grad():
        want, got = sdpa(images, tokens), flash(images, tokens)
    real = torch.arange(want["text"].shape[1])[None] <= tokens.argmax(-1)[:, None]
    torch.testing.assert_close(got["text"][real], want["text"][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["vqa_logits"], want["vqa_logits"], rtol=1e-5, atol=1e-5)
    if not question_only:
        torch.testing.assert_close(got["image"], want["image"], rtol=1e-5, atol=1e-5)
    layer = flash.text_layers[0].self_attn  # the padded query rows of one attention: zeros
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        o = F.scaled_dot_product_attention  # (the raw attention, before the output projection)
        q, k, v = (lin(x).view(2, 5, 4, 8) for lin in (layer.query, layer.key, layer.value))
        packed = meter.flash_varlen_attention(q, k, v, mask, mask)
        ref = o(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :])
    assert torch.equal(packed[0, 3:], torch.zeros(2, 4, 8))
    torch.testing.assert_close(packed[mask], ref.transpose(1, 2)[mask], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"attn_backend: expected one of \('sdpa', 'flash_attn'\), got 'xformers'"):
        _tiny(attn_backend="xformers")
